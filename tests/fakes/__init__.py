"""Fakes of the platforms outside this machine (Discord, Slack) and a hand-built model, for tests of the real clients."""
