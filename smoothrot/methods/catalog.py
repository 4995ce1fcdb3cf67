"""Every shipped method, registered in report order: importing this module fills the registry
(registry.py imports it on first use). A new method is a module plus its line here."""

from smoothrot.methods import baselines, gptq, policy, trained  # noqa: F401

# The import order above is not the registration order: gptq imports the methods it wraps, and
# each module registers its methods when it is first imported (baselines, then policy, trained,
# then their GPTQ variants).
