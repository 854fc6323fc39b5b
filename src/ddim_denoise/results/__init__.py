"""The results studies, and the docs written from them: the generated blocks of README.md and docs/ (``docs``)."""
