"""Built-in method plugins (installed as ``cirbench.methods``). Each subpackage is one plugin."""
