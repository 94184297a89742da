"""The front end: the compile pipeline as a list of stages (:mod:`.pipeline`) and the command-line tools
(:mod:`.cli`: ``lowbit-compile``, ``lowbit-export``, ``lowbit-run``, ``lowbit-finetune``, ``lowbit-import-gptq``)."""
