"""The command-line programs: ebwm-generate (generate), ebwm-eval (evaluate), ebwm-ladder (ladder), ebwm-fit (fit);
recipe_help prints the recipe keys for ebwm-pretrain --help."""
