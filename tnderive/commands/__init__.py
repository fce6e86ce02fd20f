"""CLI sub-commands. Each module defines `register(subparsers)` adding one sub-command whose
handler is set with `parser.set_defaults(func=handler)`; handler(args) -> exit code."""

# module names under tnderive.commands, in the order `tnderive --help` lists them
COMMANDS = ["demo", "derive", "draw", "eval", "codegen", "kfac", "hessian_blocks", "gallery"]
