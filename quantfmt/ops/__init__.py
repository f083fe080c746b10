"""Operations on whole models, built on sources and io: convert (and load with a recipe, save),
compare, inspect, verify. The CLI and the Python API call these; nothing here prints."""
