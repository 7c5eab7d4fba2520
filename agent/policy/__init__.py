"""The policy: which data classes exist, which may never leave, and the one gate."""
