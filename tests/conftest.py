from importlib.metadata import entry_points

# An installed sourcebox registers its pytest plugin as an entry point; a bare checkout
# loads it from here instead (never both: pytest refuses a plugin registered twice).
if not any(entry.value == "runner.pytest_plugin" for entry in entry_points(group="pytest11")):
    pytest_plugins = ["runner.pytest_plugin"]
