"""Reading finished episodes: the type of each action, and the metrics a multi-turn step logs.

An episode is the ``trajectory`` column the multi-turn sampler gives each completion:
``{"messages", "steps": [{"action", "observation", "reward", "done", "info"}], "end", "turns",
"episode_reward"}``; ``info["tool_calls"]`` lists a turn's tool calls with their ``error``.
"""

from __future__ import annotations

import re
from collections import Counter

DEFAULT_ACTION = r"\b([A-Z][A-Z_]{1,})\b"
END_KINDS = ("done", "max_turns", "length", "error", "timeout")


UNKNOWN_TOOL = "unknown_tool"


def tool_name(call: dict) -> str:
    """A call's tool as metrics name it: a tool the environment has, else one bucket, so a policy that
    invents names cannot invent metric keys."""
    return str(call["name"]) if call.get("known", True) and call.get("name") else UNKNOWN_TOOL


def action_types(episode: dict, pattern: str = DEFAULT_ACTION) -> list[str]:
    """Each step's action type: its first tool call's tool (``unknown_tool`` for a name the environment
    does not have), else the first match of ``pattern`` in the turn's text (an upper-case word such as
    ``CLICK`` of ``CLICK([1])``), else ''."""
    compiled, types = re.compile(pattern), []
    for step in episode["steps"]:
        calls = (step.get("info") or {}).get("tool_calls") or []
        if calls:
            types.append(tool_name(calls[0]))
            continue
        match = compiled.search(step.get("action") or "")
        types.append(match.group(1) if match else "")
    return types


def episode_metrics(episodes: list[dict | None] | None) -> dict[str, float]:
    """Turns per trajectory, how trajectories ended (shares), environment reward per episode and per
    step, tool calls and failures (in all and per tool), and the share of each action type; {} for
    one-turn rollouts."""
    episodes = [e for e in episodes or [] if e]
    if not episodes:
        return {}
    steps = [step for e in episodes for step in e["steps"]]
    ends = Counter(e["end"].split(":", 1)[0] for e in episodes)
    metrics = {"episode/turns": sum(e["turns"] for e in episodes) / len(episodes),
               "episode/reward": sum(e["episode_reward"] for e in episodes) / len(episodes),
               "episode/step_reward": sum(s["reward"] for s in steps) / len(steps) if steps else 0.0}
    metrics.update({f"episode/end_{kind}": ends.get(kind, 0) / len(episodes) for kind in END_KINDS})
    calls = [call for step in steps for call in (step.get("info") or {}).get("tool_calls", [])]
    metrics["tools/calls"] = float(len(calls))
    metrics["tools/failures"] = float(sum(1 for call in calls if call.get("error")))
    for name in sorted({tool_name(call) for call in calls}):
        mine = [call for call in calls if tool_name(call) == name]
        metrics[f"tools/{name}/calls"] = float(len(mine))
        metrics[f"tools/{name}/failures"] = float(sum(1 for call in mine if call.get("error")))
    types = Counter(t for e in episodes for t in action_types(e) if t)
    total = sum(types.values())
    metrics.update({f"actions/{name}": count / total for name, count in sorted(types.items())})
    return metrics
