"""The run layer: a request resolved into a plan and run into a report; specs and settings, projects, estimates."""
