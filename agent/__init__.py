"""pbx-agent: a telemetry agent for Asterisk/FreePBX that keeps its customer's promises.

Collectors gather records; one policy gate approves them; a durable outbox holds
them; only ``agent.uplink`` sends them to the vendor. Nothing else leaves the box.
"""

__version__ = "0.1.0"
