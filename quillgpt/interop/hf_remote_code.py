"""Remote code shipped beside a QuillGPT model exported for transformers (as `modeling_quillgpt.py`).

Loaded with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`. It reuses
transformers' NanoChat, which matches QuillGPT's modern recipe (rotary, weightless RMSNorm, QK-norm,
ReLU², soft-capped logits) except for one thing no weight can absorb: NanoChat normalises the token
embeddings before the first block and QuillGPT does not. Here the shared norm becomes the identity
and the final norm moves into the LM head. (NanoChat's opposite rotation convention is folded into
the exported q/k weights.) This file imports transformers only, never quillgpt.
"""

import torch.nn.functional as F
from torch import nn
from transformers.models.nanochat.configuration_nanochat import NanoChatConfig
from transformers.models.nanochat.modeling_nanochat import NanoChatForCausalLM, NanoChatModel


class QuillGPTConfig(NanoChatConfig):
    model_type = "quillgpt"


class QuillGPTModel(NanoChatModel):
    config_class = QuillGPTConfig

    def __init__(self, config):
        super().__init__(config)
        self.norm = nn.Identity()  # NanoChat applies it to the embeddings and to the output


class NormedLMHead(nn.Linear):
    """The final weightless RMSNorm, then the LM head's matrix."""

    def __init__(self, config):
        super().__init__(config.hidden_size, config.vocab_size, bias=False)
        self.eps = config.rms_norm_eps

    def forward(self, x):
        return super().forward(F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x))


class QuillGPTForCausalLM(NanoChatForCausalLM):
    config_class = QuillGPTConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = QuillGPTModel(config)
        self.lm_head = NormedLMHead(config)
        self.post_init()
