"""Every job's typed config, the option types, and the flag/YAML loading generated from them (no torch)."""
