"""YAML pipelines: a validated plan (:mod:`.schema`) run through the library jobs (:mod:`.run`)."""
