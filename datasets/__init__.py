"""Built-in dataset plugins (installed as ``cirbench.datasets``). Each subpackage is one plugin."""
