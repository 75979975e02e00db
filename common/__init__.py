"""Code the pipeline scripts share: configuration, devices and precision, files, distributed runs, plots."""
