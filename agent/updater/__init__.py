"""The update unit: the only code that installs a new pbx-agent, run as root by
pbx-agent-update.service, never by the daemon.

``apt.py`` is the boundary to apt and dpkg (confined to the vendor's signed
source); ``run.py`` decides, from the customer's switch and ``updates:``
setting, whether to look, whether to install, and whether to roll back.
"""
