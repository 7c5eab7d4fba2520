"""Health: the machine (psutil) and, when configured, Asterisk itself over AMI.

Nothing is imported here: ``agent.config`` reads :mod:`.settings` on every
``agentctl`` start, and the AMI client (:mod:`.ami`, :mod:`.pbx`) is imported
only by a collector whose configuration has ``pbx.ami``.
"""
