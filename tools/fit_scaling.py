"""Scaling-law fits of a ladder's runs (the same as the `ebwm-fit` command; see ebwm_scale/cli/fit.py).

python tools/fit_scaling.py --ladder nlp_tiny_cpu --runs-dir runs/ladders/nlp_tiny_cpu --out docs/results/nlp_tiny_cpu
"""

from ebwm_scale.cli.fit import main

if __name__ == "__main__":
    main()
