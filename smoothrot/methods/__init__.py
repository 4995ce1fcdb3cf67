"""How each method chooses a site's transform: a registry (registry.py) of methods, one module
each; catalog.py registers them all, in report order, when the registry is first asked."""
