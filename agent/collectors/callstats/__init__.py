"""Call statistics: CDRs reduced on the box to counters that identify no one."""
