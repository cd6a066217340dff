"""The dataset build (paper §4): one stage per module, each with its config, pure core and Ray layer."""
