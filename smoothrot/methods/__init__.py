"""How each method chooses a site's transform: a registry (registry.py) of methods, each in its
own module, run by the job in registration order. Importing this package registers them all;
a module imports the modules of the methods it builds on, so they register first."""

from smoothrot.methods import baselines, gptq, policy, trained  # noqa: F401
