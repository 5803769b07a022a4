"""grpokit's own sampling backend: prefill once per prompt, then decode all G samples together.

Each prompt's KV cache is computed once and repeated G times (a group shares its prompt),
then one forward per new token serves every sequence. Finished sequences keep producing
padding (masked out) so shapes stay fixed; decoding stops when all have hit EOS or
``max_new_tokens``. Sampling applies temperature, then top-k, then top-p (as HF does).
"""

from __future__ import annotations

import torch

from grpokit.models.parts import backbone_and_head
from grpokit.models.sharding import full_weights
from grpokit.rollout.contract import Rollouts
from grpokit.rollout.decode import lean_decoder_for
from grpokit.rollout.encoding import PromptBatch
from grpokit.models.multimodal import positions_after
from grpokit.rollout.logprobs import exp_flushed_, prefill, run_backbone


MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio): seeds of neighbouring prompts land far apart


def prompt_seed(*parts: int) -> int:
    """A 63-bit seed from integers (the run's seed, the step, the round, the prompt's place), the same
    in every process."""
    seed = 0
    for part in parts:
        seed = ((seed ^ (part & (2 ** 64 - 1))) * MIX + 1) % 2 ** 64
    return seed >> 1


class RowStreams:
    """One random stream per sequence, seeded from its prompt's seed and its index in the group: what a
    sequence samples then depends on its prompt alone (and the model), not on which prompts share its
    batch or its process (``rollout.seed_per_prompt``)."""

    def __init__(self, seeds_B: list[int], group_size: int, device):
        self.generators = [torch.Generator(device).manual_seed(prompt_seed(seed, j))
                           for seed in seeds_B for j in range(group_size)]
        self.device = device

    def uniform(self) -> torch.Tensor:
        """``[N, 1]`` uniforms in [0, 1), one from each sequence's stream."""
        return torch.cat([torch.rand(1, 1, generator=g, device=self.device) for g in self.generators])


def streams_for(batch: PromptBatch, group_size: int, generator: torch.Generator, device):
    """The per-sequence streams when the batch's prompts carry seeds, else the sampler's own generator."""
    return generator if batch.seeds is None else RowStreams(batch.seeds, group_size, device)


def sample_next(logits_NV: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | RowStreams | None) -> torch.Tensor:
    """Draw one token per row from ``[N, V]`` logits, with one uniform per row from ``generator`` (a
    generator for the whole batch, or each row's own stream)."""
    logits_NV = logits_NV.float() / temperature
    if top_k and top_k < logits_NV.size(-1):
        kth_N1 = torch.topk(logits_NV, top_k, dim=-1).values[:, -1:]  # [N, 1]
        logits_NV = logits_NV.masked_fill(logits_NV < kth_N1, float("-inf"))
    if top_p < 1.0:
        sorted_NV, order_NV = torch.sort(logits_NV, descending=True)
        cum_NV = sorted_NV.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop_sorted_NV = (cum_NV - sorted_NV.softmax(dim=-1)) >= top_p
        drop_NV = torch.zeros_like(drop_sorted_NV).scatter(-1, order_NV, drop_sorted_NV)
        logits_NV = logits_NV.masked_fill(drop_NV, float("-inf"))
    return inverse_cdf(logits_NV.softmax(dim=-1), generator)


def inverse_cdf(probs_NV: torch.Tensor, generator: torch.Generator | RowStreams | None) -> torch.Tensor:
    """One draw per row from (possibly unnormalised) probabilities, by inverse-CDF sampling: one uniform
    per row and a binary search over the cumulative probabilities. torch.multinomial draws an exponential
    variate per vocabulary entry (1.5 M per step for 32 rows x 49k), which took a quarter of the decode
    time here."""
    cdf_NV = probs_NV.cumsum(dim=-1)
    if isinstance(generator, RowStreams):
        u_N1 = generator.uniform().to(cdf_NV.device) * cdf_NV[:, -1:]
    else:
        u_N1 = torch.rand(cdf_NV.size(0), 1, generator=generator, device=cdf_NV.device) * cdf_NV[:, -1:]
    # right=True: the first index whose cdf exceeds u, so zero-probability tokens are never drawn
    return torch.searchsorted(cdf_NV, u_N1, right=True).squeeze(1).clamp(max=cdf_NV.size(-1) - 1)  # [N]


def next_tokens(logits_NV: torch.Tensor, greedy: bool, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | RowStreams | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's next token ``[N]`` and its log-prob ``[N]`` (fp32) under the model's own distribution
    (before temperature, top-k and top-p), which is what the trainer's log-prob pass computes, so the
    two compare directly.

    Plain sampling (T = 1, no top-k, no top-p) draws from the same log-softmax it scores with: one
    fp32 pass over the vocabulary instead of a cast, division and softmax to sample and another cast
    and logsumexp to score, which cost a tenth of decode time at 49k tokens."""
    logp_NV = torch.log_softmax(logits_NV.float(), dim=-1)
    if greedy:
        next_N = logits_NV.argmax(dim=-1)
    elif temperature == 1.0 and not top_k and top_p >= 1.0:
        next_N = inverse_cdf(exp_flushed_(logp_NV.clone()), generator)
    else:
        next_N = sample_next(logits_NV, temperature, top_k, top_p, generator)
    return next_N, logp_NV.gather(-1, next_N[:, None]).squeeze(-1)


class TorchSampler:
    """Decode with the policy's own forward and a KV cache; works for any HF causal LM.

    Implements ``rollout.contract.Sampler``; built by ``rollout.build_sampler``."""

    lean_decode = True  # decode Llama-family text models over a preallocated cache (rollout/decode.py)

    def __init__(self, policy, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int = 0):
        self.policy = policy
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.generator = torch.Generator(policy.device).manual_seed(seed)

    def sync_weights(self, policy) -> None:
        """It samples from the policy's own modules; only a merged sampling copy needs refreshing."""
        policy.sync_merged()

    def state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state(self, state) -> None:
        # checkpoints before the Sampler contract stored the generator's state tensor alone
        self.generator.set_state(state if isinstance(state, torch.Tensor) else state["generator"])

    @torch.no_grad()
    def generate(self, batch: PromptBatch, num_generations: int, greedy: bool = False) -> Rollouts:
        policy, G = self.policy, num_generations
        pad_id = policy.tokenizer.pad_token_id
        device = policy.device
        ids_BP, mask_BP = batch.input_ids_BP.to(device), batch.attention_mask_BP.to(device)
        model = policy.sampling_model
        backbone, head = backbone_and_head(model)
        was_training = model.training
        model.eval()  # no dropout while sampling
        with policy.autocast(), full_weights(model):  # FSDP: the whole model, gathered once
            # the group shares its prompt (and its images): prefill once, then repeat the cache G times
            hidden_BPH, cache, pos_XBP = prefill(backbone, ids_BP, mask_BP, batch.multimodal)
            if G > 1:
                cache.batch_repeat_interleave(G)
            logits_NV = head(hidden_BPH[:, -1, :]).repeat_interleave(G, dim=0)  # [N, V]
            mask_NL = mask_BP.repeat_interleave(G, dim=0)  # [N, P + t]
            pos_XN1 = positions_after(pos_XBP, G, 1)  # [..., N, 1]: the first completion token's position
            N = logits_NV.size(0)
            eos_E = torch.tensor(policy.eos_ids, device=device)
            finished_N = torch.zeros(N, dtype=torch.bool, device=device)
            tokens, logprobs = [], []
            streams = streams_for(batch, G, self.generator, device)
            lean = (lean_decoder_for(backbone, cache, mask_NL, self.max_new_tokens)
                    if self.lean_decode and batch.multimodal is None else None)
            if lean is not None:
                cache = None  # its tensors now live in the decoder's own buffers
            for _ in range(self.max_new_tokens):
                next_N, logp_N = next_tokens(logits_NV, greedy, self.temperature, self.top_k, self.top_p, streams)
                next_N = torch.where(finished_N, torch.full_like(next_N, pad_id), next_N)
                tokens.append(next_N)
                logprobs.append(logp_N)
                finished_N = finished_N | torch.isin(next_N, eos_E)
                if bool(finished_N.all()) or len(tokens) == self.max_new_tokens:
                    break
                if lean is not None:
                    logits_NV = lean.logits(head, lean.step(next_N[:, None], pos_XN1)[:, -1, :])
                else:
                    mask_NL = torch.cat([mask_NL, torch.ones_like(mask_NL[:, :1])], dim=1)
                    hidden_N1H, cache = run_backbone(backbone, cache, input_ids=next_N[:, None],
                                                     attention_mask=mask_NL, position_ids=pos_XN1)
                    logits_NV = head(hidden_N1H[:, -1, :])
                pos_XN1 = pos_XN1 + 1
        model.train(was_training)
        completion_NC = torch.stack(tokens, dim=1)  # [N, C]
        # a token counts until (and including) the first EOS of its row
        is_eos_NC = torch.isin(completion_NC, eos_E)
        after_eos_NC = (is_eos_NC.cumsum(dim=1) - is_eos_NC.long()) > 0
        completion_mask_NC = (~after_eos_NC).long()
        return Rollouts(
            prompt_ids_NP=ids_BP.repeat_interleave(G, dim=0),
            prompt_mask_NP=mask_BP.repeat_interleave(G, dim=0),
            completion_ids_NC=completion_NC,
            completion_mask_NC=completion_mask_NC,
            truncated_N=~is_eos_NC.any(dim=1),
            prompt_inputs_N=None if batch.multimodal is None else [inputs for inputs in batch.multimodal
                                                                  for _ in range(G)],
            # loss_mask_NC defaults to the completion mask: in one turn every kept token is the policy's own
            sampling_logprobs_NC=torch.stack(logprobs, dim=1) * completion_mask_NC,
        )
