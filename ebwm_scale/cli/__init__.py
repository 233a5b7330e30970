"""The command-line programs: ebwm-generate (generate), ebwm-eval (evaluate), ebwm-ladder (ladder), ebwm-fit (fit);
recipe_help prints the recipe keys for ebwm-pretrain --help; think_options holds the System-2 inference options
ebwm-generate and ebwm-eval share."""
