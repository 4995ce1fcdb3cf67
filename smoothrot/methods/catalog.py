"""Every shipped method, registered in report order (registry.py loads this module on first
use). A new method is a module under smoothrot/methods/ plus its entry here."""

from smoothrot.methods.act_tuned import ActTunedGPTQ
from smoothrot.methods.baselines import HADAMARD, RTN
from smoothrot.methods.gptq import WithGPTQ
from smoothrot.methods.policy import ALPHA_ONLY, JOINT, JOINT_GLOBAL, QUANTILE, SMOOTHROT_MAX
from smoothrot.methods.registry import register
from smoothrot.methods.trained import TRAINED
from smoothrot.methods.trained_block import TRAINED_BLOCK
from smoothrot.methods.trained_kl import TRAINED_KL

for _method in (
    RTN, HADAMARD, SMOOTHROT_MAX, ALPHA_ONLY, QUANTILE, JOINT_GLOBAL, JOINT, TRAINED,
    TRAINED_BLOCK,
    WithGPTQ(HADAMARD, "Hadamard + GPTQ"), WithGPTQ(SMOOTHROT_MAX), WithGPTQ(QUANTILE),
    WithGPTQ(JOINT, "joint + GPTQ"), WithGPTQ(TRAINED, "trained + GPTQ"),
    WithGPTQ(TRAINED_BLOCK, "trained (block) + GPTQ"),
    ActTunedGPTQ(SMOOTHROT_MAX), ActTunedGPTQ(TRAINED_BLOCK, "trained (block) + GPTQ + act-tuned"),
    TRAINED_KL, WithGPTQ(TRAINED_KL, "trained (KL) + GPTQ"),
):
    register(_method)
