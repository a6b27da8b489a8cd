"""`ptemu bench`: ptemu's handler against the naive pipeline, on corpus events.

Not part of the test suite: a benchmark measures, it asserts nothing. The
naive pipeline (`naive`) is written the way a user would write it without
ptemu, and imports Capstone and Unicorn itself on purpose.
"""
