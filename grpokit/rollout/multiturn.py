"""Multi-turn rollouts: the policy acts in an environment, turn after turn, all P x G trajectories together.

One decode loop serves every trajectory. Each forward feeds one token per sequence: the
token the policy just sampled (its own, in the loss), the next token of an environment's
text reply (in the context, out of the loss), or, for a sequence that has ended, a padding
token the attention mask hides. A reply's tokens ride along in passes the other sequences
make anyway, so a text reply costs no forward of its own. A reply with images is fed whole,
right after the turn it answers, in a forward as wide as it (the others feed their one token):
its image tokens must meet their pixels in one forward. A sequence's position advances only on
the tokens it keeps, so after the run its tokens are packed to the left (padding dropped) and
the log-prob passes score exactly the ids that were sampled, at the positions they were
sampled at.

A turn ends at an end-of-turn token. The environment then steps on that turn's text; every
sequence that ended a turn at the same token steps concurrently, each with a timeout. Its
observation is rendered with the chat template as the next message (the tokens between the
policy's end-of-turn and the next assistant header), cut to ``max_tool_output_tokens``. An
observation's images (a vision-language policy's) go through the processor with it: their
image tokens are fed in the same forward as their pixels, so the model's own vision path
(Qwen3-VL's deepstack included) places them, at the (time, height, width) positions Qwen's
rotary embedding gives an image block. ``reset``'s observation joins the prompt itself. A
trajectory ends when the environment says done, after ``max_turns`` policy turns, at the
length limit (``max_new_tokens`` completion tokens, the environment's included), or when its
environment raises or hangs (the reason is kept with the trajectory; ``max_failures`` of
those in a row stop the run, as rewards do).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from grpokit.data.chat import render_chat
from grpokit.data.images import block_image
from grpokit.envs.contract import as_message, as_step_result, image_blocks, opened_row
from grpokit.errors import EnvFailure
from grpokit.models.multimodal import (TOKEN_TYPE_SUFFIX, chat_template_of, collate, join_pieces, next_positions,
                                       positions_after, process_text, reads_images, span_positions, tokenizer_of)
from grpokit.models.padding import pad_right
from grpokit.models.parts import backbone_and_head
from grpokit.models.sharding import full_weights
from grpokit.rollout.contract import Rollouts
from grpokit.rollout.encoding import PromptBatch
from grpokit.rollout.logprobs import prefill, run_backbone
from grpokit.rollout.sampler import TorchSampler, next_tokens, streams_for

log = logging.getLogger(__name__)
_DUMMY = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]


@dataclass
class Trajectory:
    """One episode as rewards see it (the ``trajectory`` column) and the report shows it."""

    messages: list[dict] = field(default_factory=list)  # assistant turns and observations, in order
    steps: list[dict] = field(default_factory=list)  # per policy turn: action, observation, reward, done, info
    end: str = ""  # done | max_turns | length | error: ... | timeout

    @property
    def reward(self) -> float:
        return sum(step["reward"] for step in self.steps)

    def as_row(self) -> dict:
        return {"messages": self.messages, "steps": self.steps, "end": self.end, "turns": len(self.steps),
                "episode_reward": self.reward}


@dataclass
class _Sequence:
    environment: object
    trajectory: Trajectory
    tokens: list[int] = field(default_factory=list)  # completion ids so far (the environment's included)
    own: list[bool] = field(default_factory=list)  # True where the policy generated the token
    logprobs: list[float] = field(default_factory=list)
    turn_start: int = 0  # where the current policy turn began in ``tokens``
    pending: list[int] = field(default_factory=list)  # a text reply's tokens still to feed, one per pass
    feed: list[int] = field(default_factory=list)  # kept since the last forward: what the next one feeds
    feed_images: dict = field(default_factory=dict)  # the image inputs of a reply in ``feed``
    images: list[dict] = field(default_factory=list)  # every observation's image inputs, in order
    finished: bool = False

    def keep(self, token: int, own: bool, logprob: float) -> int:
        self.tokens.append(token)
        self.own.append(own)
        self.logprobs.append(logprob)
        return token


class MultiTurnSampler(TorchSampler):
    """The torch sampler's decoding, driven through an environment; implements the Sampler contract."""

    def __init__(self, policy, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int = 0, *, environment, max_turns: int = 4, max_tool_output_tokens: int = 64,
                 timeout_s: float = 30.0, max_failures: int = 8):
        super().__init__(policy, max_new_tokens, temperature, top_p, top_k, seed)
        self.environment, self.max_turns = environment, max_turns
        self.max_tool_output_tokens, self.timeout_s, self.max_failures = max_tool_output_tokens, timeout_s, max_failures
        self.failures_in_a_row = 0

    # ------------------------------------------------------------------ environment calls

    def _call_all(self, calls: list[tuple[_Sequence, callable]], what: str) -> list:
        """Run ``fn()`` for each sequence concurrently, each within the timeout; a failure ends that
        trajectory (``None`` comes back for it) with the reason, and counts toward stopping the run.
        Daemon threads, so an environment that never returns cannot keep the process from exiting."""
        outcomes: list[dict] = [{} for _ in calls]

        def run(fn, outcome):
            try:
                outcome["value"] = fn()
            except BaseException as exc:  # the environment's own failure: that trajectory's, never the run's
                outcome["error"] = exc

        threads = [threading.Thread(target=run, args=(fn, outcome), daemon=True, name="grpokit-env")
                   for (_, fn), outcome in zip(calls, outcomes)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + self.timeout_s
        results = []
        for (seq, _), thread, outcome in zip(calls, threads, outcomes):
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                results.append(self._failed(seq, f"timeout: {what} took over {self.timeout_s:g} s"))
            elif "error" in outcome:
                exc = outcome["error"]
                results.append(self._failed(seq, f"error: {what} raised {type(exc).__name__}: {exc}"))
            else:
                self.failures_in_a_row = 0
                results.append(outcome["value"])
        return results

    def _failed(self, seq: _Sequence, reason: str):
        seq.finished, seq.trajectory.end = True, reason
        self.failures_in_a_row += 1
        log.warning("environment %s: the trajectory ends (%s)", self.environment.name, reason)
        if self.failures_in_a_row >= self.max_failures:
            raise EnvFailure(f"environment {self.environment.name!r} failed {self.failures_in_a_row} times in a row; "
                             f"last: {reason}. Fix the environment, or raise rollout.environment_timeout_s if it is "
                             "only slow")
        return None

    def _observation(self, message: dict) -> tuple[list[int], dict]:
        """The tokens that follow the policy's end-of-turn token: the observation as the next message, then
        the assistant header, as the chat template renders them, its text cut to the tool-output limit;
        and its images' inputs as the processor gives them (empty without images)."""
        processor = self.policy.processor
        tokenizer = tokenizer_of(processor)
        where = f"environment {self.environment.name!r}"
        images = [block_image(block, where) for block in image_blocks(message["content"])]
        if images and not reads_images(processor):
            raise EnvFailure(f"{where}: an observation holds {len(images)} image(s), but the policy reads text only; "
                             "train a vision-language model (model.name), or return text observations")
        budget = [self.max_tool_output_tokens]

        def cut(text: str) -> str:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            kept, budget[0] = ids[:budget[0]], max(0, budget[0] - len(ids))
            return text if len(kept) == len(ids) else tokenizer.decode(kept) + " …"

        content = message["content"]
        content = cut(content) if isinstance(content, str) else [
            {"type": "image"} if part.get("type") == "image" else {**part, "text": cut(part.get("text", ""))}
            for part in content]
        after = render_chat(tokenizer, _DUMMY + [{**message, "content": content}], "<environment>",
                            generation_prompt=True, template=chat_template_of(processor))[self._turn_end:]
        if not images:
            return tokenizer(after, add_special_tokens=False)["input_ids"], {}
        ids, inputs = process_text(processor, after, images)
        # token types are derived from the ids where a span needs them (models.multimodal.span_positions)
        return ids, {key: value for key, value in inputs.items() if not key.endswith(TOKEN_TYPE_SUFFIX)}

    @functools.cached_property
    def _turn_end(self) -> int:
        """Where a rendered assistant turn's end-of-turn token ends in the template's text: what follows
        it in a longer rendering is the environment's reply and the next assistant header."""
        tokenizer = tokenizer_of(self.policy.processor)
        before = render_chat(tokenizer, _DUMMY, "<environment>", template=chat_template_of(self.policy.processor))
        eos = tokenizer.convert_ids_to_tokens(self.policy.eos_ids[0])
        return before.rindex(eos) + len(eos)

    # ------------------------------------------------------------------ decoding

    @torch.no_grad()
    def generate(self, batch: PromptBatch, num_generations: int, greedy: bool = False) -> Rollouts:
        policy, G = self.policy, num_generations
        device, pad_id = policy.device, policy.tokenizer.pad_token_id
        rows = [row for row in batch.rows for _ in range(G)]
        seqs = [_Sequence(self.environment.make(), Trajectory()) for _ in rows]
        openings = self._call_all([(seq, lambda seq=seq, row=row: seq.environment.reset(row))
                                   for seq, row in zip(seqs, rows)], "reset()")
        batch = self._opened(batch, seqs, openings, G)
        ids_BP, mask_BP = batch.input_ids_BP.to(device), batch.attention_mask_BP.to(device)
        model = policy.sampling_model
        backbone, head = backbone_and_head(model)
        was_training = model.training
        model.eval()
        with policy.autocast(), full_weights(model):  # FSDP: the whole model, gathered once
            hidden_BPH, cache, pos_XBP = prefill(backbone, ids_BP, mask_BP, batch.multimodal)
            if G > 1:
                cache.batch_repeat_interleave(G)
            logits_NV = head(hidden_BPH[:, -1, :]).repeat_interleave(G, dim=0)
            mask_NL = mask_BP.repeat_interleave(G, dim=0)
            pos_XN = positions_after(pos_XBP, G, 1)[..., 0]  # the position each sequence's next token takes
            streams = streams_for(batch, G, self.generator, device)
            # every unfinished sequence keeps at least one token per pass, so max_new_tokens passes end them all
            for _ in range(self.max_new_tokens):
                sampled_N, logp_N = next_tokens(logits_NV, greedy, self.temperature, self.top_k, self.top_p, streams)
                ended = []
                for i, seq in enumerate(seqs):
                    seq.feed, seq.feed_images = [], {}
                    if seq.finished:
                        continue
                    if seq.pending:  # the environment's text reply, a token per pass
                        seq.feed.append(seq.keep(seq.pending.pop(0), own=False, logprob=0.0))
                        if not seq.pending:
                            seq.turn_start = len(seq.tokens)
                    else:
                        seq.feed.append(seq.keep(int(sampled_N[i]), own=True, logprob=float(logp_N[i])))
                        if seq.feed[-1] in policy.eos_ids:
                            ended.append(seq)
                            continue
                    if len(seq.tokens) >= self.max_new_tokens:
                        seq.finished, seq.trajectory.end = True, "length"
                self._end_turns(ended)
                if all(seq.finished for seq in seqs):
                    break
                logits_NV, cache, mask_NL, pos_XN = self._feed(backbone, head, cache, seqs, mask_NL, pos_XN, pad_id)
        model.train(was_training)
        return self._rollouts(ids_BP, mask_BP, G, seqs, batch)

    def _feed(self, backbone, head, cache, seqs: list[_Sequence], mask_NL, pos_XN, pad_id):
        """One forward over what every sequence kept since the last: ``[N, W]`` tokens, right-padded (a
        finished sequence feeds only padding), its observation images with them. The next logits are
        each sequence's last fed token's; positions continue from each sequence's own."""
        device = mask_NL.device
        feeds = [[] if seq.finished else seq.feed for seq in seqs]
        ids_NW, real_NW = pad_right([feed or [pad_id] for feed in feeds], pad_id)
        real_NW = real_NW * torch.tensor([[bool(feed)] for feed in feeds])
        ids_NW, real_NW = ids_NW.to(device), real_NW.long().to(device)
        inputs = {}
        if any(seq.feed_images for seq in seqs):
            inputs = {k: v.to(device) for k, v in collate([seq.feed_images for seq in seqs], ids_NW.size(1),
                                                          left=False).items()}
        if ids_NW.size(1) == 1:  # a token each (the common pass): each at its sequence's next position
            positions = pos_XN[..., None]
        else:
            positions = span_positions(backbone, ids_NW, real_NW, inputs, pos_XN)
        mask_NL = torch.cat([mask_NL, real_NW], dim=1)
        hidden_NWH, cache = run_backbone(backbone, cache, input_ids=ids_NW, attention_mask=mask_NL,
                                         position_ids=positions, **inputs)
        last_N = (real_NW.sum(dim=1) - 1).clamp(min=0)
        logits_NV = head(hidden_NWH[torch.arange(len(seqs), device=device), last_N])
        fed_N = real_NW.bool().any(dim=1)
        pos_XN = torch.where(fed_N, next_positions(positions, real_NW), pos_XN)  # padding takes no position
        return logits_NV, cache, mask_NL, pos_XN

    def _opened(self, batch: PromptBatch, seqs: list[_Sequence], openings: list, G: int) -> PromptBatch:
        """The batch with ``reset``'s observations in its prompts (the rows re-encoded), or as it was when
        ``reset`` adds nothing. A row's G trajectories must open alike: its group shares one prompt."""
        where = f"environment {self.environment.name!r}"
        messages = []
        for seq, opening in zip(seqs, openings):
            try:
                messages.append(None if seq.finished else as_message(opening, "user", where))
            except EnvFailure as exc:
                messages.append(self._failed(seq, f"error: reset() {exc}"))
        if all(message is None for message in messages):
            return batch
        if batch.encoder is None:
            raise EnvFailure(f"{where}: reset() returned an observation, but these prompts came without their "
                             "encoder to add it with; build the batch with a PromptEncoder")
        rows = []
        for b, row in enumerate(batch.rows):
            alive = [(seq, message) for seq, message in zip(seqs[b * G:(b + 1) * G], messages[b * G:(b + 1) * G])
                     if not seq.finished]
            first = alive[0][1] if alive else None
            if any(message != first for _, message in alive):
                raise EnvFailure(f"{where}: reset() gave the {G} trajectories of one row different observations; "
                                 "GRPO compares G attempts at the same start, so make reset depend on the row only "
                                 "(seed any randomness from it)")
            rows.append(row if first is None else opened_row(row, first, f"{where} reset()"))
        opened = batch.encoder(rows)
        opened.seeds = batch.seeds
        return opened

    def _end_turns(self, ended: list[_Sequence]) -> None:
        """Step the environments of the sequences whose policy turn just ended, concurrently."""
        tokenizer = self.policy.tokenizer
        steps = []
        for seq in ended:
            action = tokenizer.decode(seq.tokens[seq.turn_start:], skip_special_tokens=True)
            seq.trajectory.messages.append({"role": "assistant", "content": action})
            steps.append((seq, action))
        results = self._call_all([(seq, lambda seq=seq, action=action: seq.environment.step(action))
                                  for seq, action in steps], "step()")
        for (seq, action), raw in zip(steps, results):
            if seq.finished:  # the call failed; the reason is recorded
                seq.trajectory.steps.append({"action": action, "observation": None, "reward": 0.0, "done": True,
                                             "info": {"error": seq.trajectory.end}})
                continue
            where = f"environment {self.environment.name!r}"
            try:
                result = as_step_result(raw, where)
                message = as_message(result.observation, "user", where)
            except EnvFailure as exc:
                self._failed(seq, f"error: {exc}")
                continue
            seq.trajectory.steps.append({"action": action, "observation": message, "reward": result.reward,
                                         "done": result.done, "info": result.info})
            if result.done:
                seq.finished, seq.trajectory.end = True, "done"
            elif len(seq.trajectory.steps) >= self.max_turns:
                seq.finished, seq.trajectory.end = True, "max_turns"
            elif message is None:
                seq.finished, seq.trajectory.end = True, "done"  # nothing to answer to: the episode is over
            else:
                ids, images = self._observation(message)
                if len(seq.tokens) + len(ids) >= self.max_new_tokens:  # no room to read it, nor to answer
                    seq.finished, seq.trajectory.end = True, "length"
                    continue
                seq.trajectory.messages.append(message)
                if not images:
                    seq.pending = ids
                    continue
                for token in ids:  # fed whole in the next forward, with the pixels
                    seq.feed.append(seq.keep(token, own=False, logprob=0.0))
                seq.turn_start = len(seq.tokens)
                seq.feed_images = images
                seq.images.append(images)

    def _rollouts(self, ids_BP, mask_BP, G, seqs, batch) -> Rollouts:
        """Each sequence's kept tokens packed to the left: the ids exactly as sampled, in the loss only
        where the policy generated them. A turn the length limit cut off is the episode's last message
        (rewards read it), though no environment saw it."""
        pad_id = self.policy.tokenizer.pad_token_id
        for seq in seqs:
            unfinished = seq.tokens[seq.turn_start:]
            if unfinished and all(seq.own[seq.turn_start:]) and unfinished[-1] not in self.policy.eos_ids:
                text = self.policy.tokenizer.decode(unfinished, skip_special_tokens=True)
                seq.trajectory.messages.append({"role": "assistant", "content": text})
        completion_NC, mask_NC = pad_right([seq.tokens or [pad_id] for seq in seqs], pad_id)
        own_NC, _ = pad_right([seq.own or [False] for seq in seqs], False)
        logp_NC, _ = pad_right([seq.logprobs or [0.0] for seq in seqs], 0.0)
        mask_NC = mask_NC * torch.tensor([[bool(seq.tokens)] for seq in seqs], dtype=mask_NC.dtype)
        loss_NC = (own_NC.bool() & mask_NC.bool()).long()
        return Rollouts(
            prompt_ids_NP=ids_BP.repeat_interleave(G, dim=0).cpu(),
            prompt_mask_NP=mask_BP.repeat_interleave(G, dim=0).cpu(),
            completion_ids_NC=completion_NC,
            completion_mask_NC=mask_NC.long(),
            truncated_N=torch.tensor([seq.trajectory.end == "length" for seq in seqs]),
            loss_mask_NC=loss_NC,
            sampling_logprobs_NC=logp_NC.float() * loss_NC,
            prompt_inputs_N=None if batch.multimodal is None else [x for x in batch.multimodal for _ in range(G)],
            completion_inputs_N=([join_pieces([(inputs, 0) for inputs in seq.images]) for seq in seqs]
                                 if any(seq.images for seq in seqs) else None),
            trajectories_N=[seq.trajectory.as_row() for seq in seqs],
        )
