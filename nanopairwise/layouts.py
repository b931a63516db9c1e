"""Every input a model of the run reads, built in one place: the policy's prompt, the judge's pair,
the BT reward model's single response, the critics' prefixes; and `sample`, the one way a policy
is sampled (rollouts, anchors, the BT normalisation, evaluation, the bootstrap's pairs).

Each response is shown the way the policy produced it: the prompt rendered by the tokenizer's
chat template as a user turn with a generation prompt, then the response as the assistant's
turn, closed by the end-of-turn token the policy emits (eos, <|im_end|>, <|eot_id|>). The judge
thus reads each response in the format its generative training saw, which is the point of a
generative RM: each end-of-turn token sees the same context as the LM deciding to stop, and as
the BT head, which reads its score at that token. For the plain template of the built-in task
(<eos> = <|endoftext|>), the judge's input (JudgeTemplate, our reading: the paper does not
publish its template):

    Principle: {principle}
    User: {prompt}
    Assistant: {response A}<eos>
    User: {prompt}
    Assistant: {response B}<eos>
    {question}
    Answer:                                  -> next token " Yes" / " No"

Every layout is built from token-id pieces, each encoded on its own: bos (where the chat family
has one: `Tokenizer.chat_bos_ids`) once at position 0, the principle line, each turn as
`Tokenizer.encode_chat` renders it without bos, each response's own ids, the end-of-turn ids.
So a response has the same ids as in a rollout (BPE on a joined string could merge
"Assistant: " + "1" into one token), can be cut to a token budget without re-tokenizing, and the
layouts agree token for token where they overlap:

    policy prompt       encode_chat(prompt)                          encode_prompt
    policy training     prompt (left-padded) + response              pack_prompt_response
    judge pair          pair_ids(a, b)                               encode_pair, encode_both_orders
                        in pieces: pair_segments (prefix-shared scoring)   encode_pair_segments
    BT single           prefix_ids + response + end-of-turn id       encode_single
    train_rm.py batch   both orders of each pair, or chosen then rejected rows   encode_rm_batch
    standard critic     prefix_ids, then the response tokens         critic_inputs
    pairwise critic     pair_ids(anchor) = the judge's input up to where B starts, then the response
"""

from dataclasses import dataclass

import torch

from nanopairwise.batching import pad_batch
from nanopairwise.distributed import gathered
from nanopairwise.rollout import Rollout, generate

# ----------------------------------------------------------------------------------------------
# the policy


def encode_prompt(tokenizer, prompt) -> list:
    """Token ids the policy is conditioned on: the prompt (a string or chat messages) rendered with
    the tokenizer's chat template and a generation prompt. SFT, rollout and evaluation all use
    this one function, so the policy always sees the same format; bos (where the family has one)
    is the first id, as in the judge's layouts (Tokenizer.encode_chat)."""
    return tokenizer.encode_chat(prompt, add_generation_prompt=True)


def pack_prompt_response(prompts, responses, pad_id: int):
    """Training layout of (prompt, response) token lists, the same as a rollout's:
    (input_ids (B, P + R), attention_mask (B, P + R), response_mask (B, R)) with prompts
    left-padded to P and responses right-padded to R."""
    p_ids, p_mask = pad_batch(prompts, pad_id, side="left")
    r_ids, r_mask = pad_batch(responses, pad_id, side="right")
    return torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), r_mask


@dataclass(frozen=True)
class Sampling:
    """How the policy samples a response: train_ppo.py's --max-new-tokens, --temperature, --top-p."""
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0


@torch.no_grad()
def sample(policy, tok, prompts, cfg: Sampling, generator: torch.Generator = None) -> Rollout:
    """One response per prompt (a string or chat messages), each encoded by encode_prompt, sampled
    with the KV-cache engine (rollout.generate) until an end-of-turn or stop token of `tok`.
    `policy` is a PolicyLogprobs (its full weights are gathered under FSDP: generation bypasses
    forward) or a bare causal LM."""
    lm = getattr(policy, "lm", policy)
    with gathered(policy):
        return generate(lm, [encode_prompt(tok, p) for p in prompts], cfg.max_new_tokens, tok.stop_token_ids,
                        tok.pad_token_id, temperature=cfg.temperature, top_p=cfg.top_p, generator=generator)


# ----------------------------------------------------------------------------------------------
# the judge and the BT reward model


@dataclass(frozen=True)
class JudgeTemplate:
    """The judge's text layout (the module docstring shows it): the question and the two verdicts
    it asks for, and the id pieces every reward-model and critic input is built from."""

    question: str = "Is the first answer better than the second? Answer Yes or No."
    yes: str = " Yes"
    no: str = " No"

    def prefix_ids(self, tokenizer, principle: str, prompt) -> list:
        """bos (if any) + "Principle: ...\n" + the prompt as a user turn with the generation prompt."""
        return (tokenizer.chat_bos_ids + tokenizer.encode(f"Principle: {principle}\n")
                + tokenizer.encode_chat(prompt, bos=False))

    def pair_segments(self, tokenizer, principle: str, prompt, a_ids, b_ids) -> tuple:
        """The judge's input in three pieces, (prefix_ids, A + end + the prompt's second user turn,
        B + end + question): the first is shared by every input of a prompt, the first two by the
        inputs with the same first answer (prefix_sharing.py runs each shared piece once)."""
        end = tokenizer.encode(tokenizer.turn_end_text)
        return (self.prefix_ids(tokenizer, principle, prompt),
                list(a_ids) + end + tokenizer.encode_chat(prompt, bos=False),
                list(b_ids) + end + tokenizer.encode(f"{self.question}\nAnswer:"))

    def pair_ids(self, tokenizer, principle: str, prompt, a_ids, b_ids=None) -> list:
        """The judge's input from the responses' ids; with b_ids None, the pairwise critic's prefix
        (the same ids, cut where response B would start)."""
        prefix, first, second = self.pair_segments(tokenizer, principle, prompt, a_ids, b_ids or [])
        return prefix + first + ([] if b_ids is None else second)

    def render(self, tokenizer, principle: str, prompt, a: str, b: str) -> str:
        """The judge's input as text, for reading: its ids decoded with the special tokens kept."""
        return tokenizer.decode(encode_pair(tokenizer, self, principle, prompt, a, b), skip_special_tokens=False)


def encode_pair_segments(tokenizer, template: JudgeTemplate, principle, prompt, a, b, max_response_tokens=256):
    """One judge input as JudgeTemplate.pair_segments' three pieces; each response is cut to
    `max_response_tokens`."""
    return template.pair_segments(tokenizer, principle, prompt, tokenizer.encode(a)[:max_response_tokens],
                                  tokenizer.encode(b)[:max_response_tokens])


def encode_pair(tokenizer, template: JudgeTemplate, principle, prompt, a, b, max_response_tokens=256):
    """Token ids of one judge input; each response is cut to `max_response_tokens`."""
    return sum(encode_pair_segments(tokenizer, template, principle, prompt, a, b, max_response_tokens), [])


def encode_single(tokenizer, template: JudgeTemplate, principle, prompt, response, max_response_tokens=256):
    """Token ids of one BT reward-model input: prefix + response + the end-of-turn id the policy
    emits (eos for plain, <|im_end|> for chatml): the score is read there."""
    return (template.prefix_ids(tokenizer, principle, prompt) + tokenizer.encode(response)[:max_response_tokens]
            + [tokenizer.end_of_turn_id])


def encode_both_orders(tokenizer, template: JudgeTemplate, pairs, max_response_tokens=256):
    """Judge inputs of preference pairs (objects with .principle, .prompt, .chosen, .rejected), each
    in both orders on adjacent rows: 2i chosen first (label 1, the yes verdict), 2i + 1 rejected
    first (label 0). Returns (token id lists, labels); position_consistency_loss reads the rows
    in these pairs."""
    seqs, labels = [], []
    for p in pairs:
        for a, b, label in ((p.chosen, p.rejected, 1), (p.rejected, p.chosen, 0)):
            seqs.append(encode_pair(tokenizer, template, p.principle, p.prompt, a, b, max_response_tokens))
            labels.append(label)
    return seqs, labels


def encode_rm_batch(tokenizer, template: JudgeTemplate, pairs, objective: str, max_response_tokens=256):
    """train_rm.py's batch of preference pairs, right-padded: (ids (N, T), mask (N, T), labels).
    pairwise: both orders of each pair (encode_both_orders), N = 2b, labels (N,); bt: the chosen
    rows then the rejected rows (encode_single), N = 2b, labels None."""
    if objective == "pairwise":
        seqs, labels = encode_both_orders(tokenizer, template, pairs, max_response_tokens)
        return (*pad_batch(seqs, tokenizer.pad_token_id, side="right"), torch.tensor(labels))
    seqs = [encode_single(tokenizer, template, p.principle, p.prompt, y, max_response_tokens)
            for y_key in ("chosen", "rejected") for p in pairs for y in [getattr(p, y_key)]]
    return (*pad_batch(seqs, tokenizer.pad_token_id, side="right"), None)


# ----------------------------------------------------------------------------------------------
# the critics


def critic_inputs(tokenizer, template: JudgeTemplate, prompts, response_ids, response_mask, pairwise: bool):
    """Critic sequences for sampled responses: a left-padded prefix, then the response tokens.

    prompts: objects with .principle, .prompt, .anchor, one per row of response_ids (B, R).
    The pairwise critic's prefix holds the anchor as the first answer (template.pair_ids);
    the standard critic's does not (template.prefix_ids). Returns (ids (B, P' + R), mask,
    P'): the value of response token t is read at position P' - 1 + t (critic_values).
    """
    prefixes = [template.pair_ids(tokenizer, p.principle, p.prompt, tokenizer.encode(p.anchor)) if pairwise
                else template.prefix_ids(tokenizer, p.principle, p.prompt) for p in prompts]
    pre_ids, pre_mask = pad_batch(prefixes, tokenizer.pad_token_id, side="left")                   # (B, P)
    device = response_ids.device
    ids = torch.cat([pre_ids.to(device), response_ids], 1)
    mask = torch.cat([pre_mask.to(device), response_mask.long()], 1)
    return ids, mask, pre_ids.size(1)
