"""``make demo``: the agent's main job on this machine, end to end, in about half a minute."""
