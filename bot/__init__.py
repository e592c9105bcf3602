"""The chat bot server: settings, the platform-free core and the platform adapters."""
