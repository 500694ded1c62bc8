"""Add-ons that connect tasks to other systems, each in a module of its own with its own extra."""
