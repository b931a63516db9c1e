"""The scalar-head model: the Bradley-Terry reward model of the baseline, and the PPO critic.

One module, two uses: a transformer trunk with a linear head that reads a scalar at every
position, (B, T) fp32.

Bradley-Terry reward model. The input is the principle, the prompt's user turn and the response y,
closed by the end-of-turn token (layouts.encode_single); the score r(x, y) is read at that last
token. Trained with -log sigmoid(r(x, y_w) - r(x, y_l)) (bt_loss), so its pair probability is
P(a > b) = sigmoid(r_a - r_b) (bt_win_prob), and its win probability against an anchor y* is
sigmoid(r(x, y) - r(x, y*)) (bt_anchor_win_probs: the bt-anchor reward of train_ppo.py).

PPO critic. The value of response token t is read where the critic has read the prefix and the
response tokens before t (critic_values). The prefix is the principle and the prompt; the
pairwise critic of Pairwise-RL also reads the anchor as the first answer, exactly as the judge
would see it (layouts.critic_inputs). Started from the judge's or the reward
model's weights (from_pretrained, new_head=True for a fresh zero head).
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanopairwise import checkpoint
from nanopairwise.batching import gather_last, score_batches
from nanopairwise.layouts import encode_single

# ----------------------------------------------------------------------------------------------
# the model


class ScalarHeadModel(nn.Module):
    """Trunk + linear scalar head: a value at every position, (B, T) fp32.

    Used as the BT reward model (score at the last token) and as the PPO critic (value of each
    prefix). The head is new (zero-initialised, so training starts from a constant prediction).
    An untied LM head is unused here and frozen, so DDP does not wait for its gradient (it stays
    in the checkpoint, which therefore still loads as a causal LM).
    """

    HEAD_FILE = "score_head.safetensors"

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        if not lm.config.tie_word_embeddings:
            lm.lm_head.requires_grad_(False)
        width = lm.lm_head_weight.shape[1]
        self.score_head = nn.Linear(width, 1, dtype=lm.lm_head_weight.dtype, device=lm.lm_head_weight.device)
        nn.init.zeros_(self.score_head.weight)
        nn.init.zeros_(self.score_head.bias)

    def forward(self, input_ids, attention_mask):
        hidden = self.lm.trunk(input_ids, attention_mask=attention_mask)                # (B, T, C)
        return self.score_head(hidden).squeeze(-1).float()                             # (B, T)

    def save_pretrained(self, path: str, state: dict = None):
        """HF checkpoint of the trunk (loads as a causal LM) plus the head in its own file.
        `state` (this module's state-dict names -> tensors) replaces its own weights, e.g. when
        gathered from FSDP shards."""
        from safetensors.torch import save_file
        state = self.state_dict() if state is None else state
        self.lm.save_pretrained(path, state={k.removeprefix("lm."): v for k, v in state.items() if k.startswith("lm.")})
        head = {k.removeprefix("score_head."): v.detach().contiguous().cpu()
                for k, v in state.items() if k.startswith("score_head.")}
        checkpoint.refuse_nonfinite(path, head)
        save_file(head, os.path.join(path, self.HEAD_FILE))

    @torch.no_grad()
    def normalize_head_(self, mean: float, std: float):
        """Make the head output (v - mean) / std: w <- w / std, b <- (b - mean) / std (a critic
        started from a BT RM then predicts the normalised reward, nanopairwise/losses.py
        normalize_scores)."""
        std = max(std, 1e-8)
        self.score_head.weight.div_(std)
        self.score_head.bias.sub_(mean).div_(std)

    @torch.no_grad()
    def set_bias_(self, value: float):
        """Start the head at a constant: bias <- value (a fresh head's weight is 0, so V = value
        everywhere; train_ppo.py --critic-bias init-mean)."""
        self.score_head.bias.fill_(value)

    @classmethod
    def from_pretrained(cls, path: str, dtype=None, device=None, new_head: bool = False):
        """Load trunk (and head unless `new_head`, e.g. a critic initialised from a judge)."""
        from safetensors.torch import load_file
        from nanopairwise.model import Transformer
        model = cls(Transformer.from_pretrained(path, dtype=dtype, device=device))
        head_path = os.path.join(path, cls.HEAD_FILE)
        if not new_head:
            if not os.path.exists(head_path):
                raise FileNotFoundError(f"{head_path}: no scalar head here; is {path} a BT reward model?")
            model.score_head.load_state_dict(load_file(head_path, device=str(model.score_head.weight.device)))
        return model


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: -log sigmoid(r_w - r_l), mean over pairs."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


# ----------------------------------------------------------------------------------------------
# reward-model scores


@torch.no_grad()
def scalar_scores(model: ScalarHeadModel, tokenizer, template, items, batch_size=64,
                  max_response_tokens=256, device=None):
    """BT reward r(x, y) for each (principle, prompt, response): (n,) fp32 on CPU."""
    encode = lambda it: encode_single(tokenizer, template, *it, max_response_tokens=max_response_tokens)
    score = lambda ids, mask: gather_last(model(ids, mask), mask)                       # (b, T) -> (b,)
    return score_batches(score, encode, items, tokenizer.pad_token_id, batch_size,
                         device or model.score_head.weight.device)


def bt_win_prob(r_a: torch.Tensor, r_b: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry P(a > b) = sigmoid(r_a - r_b); P(b > a) = 1 - P(a > b) exactly."""
    return torch.sigmoid(r_a.float() - r_b.float())


@torch.no_grad()
def bt_anchor_win_probs(model: ScalarHeadModel, tokenizer, template, items, cache: dict, **kw):
    """The BT model's win probability of y against the anchor y*, sigmoid(r(x, y) - r(x, y*)),
    for each (principle, prompt, y, anchor) item: (n,) fp32 on CPU. Pairwise-RL's bounded,
    anchor-relative reward shape from a scalar RM. r(x, y*) is scored once per (principle,
    prompt, anchor) and kept in `cache` (a dict the caller holds for the run)."""
    todo = {(pr, str(q), a): (pr, q, a) for pr, q, _, a in items if (pr, str(q), a) not in cache}  # q: str or messages
    cache.update(zip(todo, scalar_scores(model, tokenizer, template, list(todo.values()), **kw).tolist()))
    r_y = scalar_scores(model, tokenizer, template, [(pr, q, y) for pr, q, y, _ in items], **kw)
    r_anchor = torch.tensor([cache[(pr, str(q), a)] for pr, q, _, a in items])
    return bt_win_prob(r_y, r_anchor)


# ----------------------------------------------------------------------------------------------
# critic


def critic_values(critic: "ScalarHeadModel", ids, mask, prefix_len: int, R: int) -> torch.Tensor:
    """(B, R) values: at position P - 1 + t the critic has read the prefix and response tokens < t."""
    return critic(ids, mask)[:, prefix_len - 1:prefix_len - 1 + R]
