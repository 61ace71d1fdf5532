"""What every benchmark does with its result: print the markdown, and append it to `--out`."""


def emit(text: str, out: str | None) -> None:
    print(text)
    if out:
        with open(out, "a") as f:
            f.write(text.rstrip("\n") + "\n\n")
