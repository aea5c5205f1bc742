"""The one exception type for bad user input (files, records, configs, prompts)."""


class InputError(ValueError):
    """Bad input from the user. The message names the file/record/field and says what to do."""
