"""Command line: ``python -m sandbox {check,profiles,show,diff,audit,snapshot}``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .audit import audit_script
from .check import check
from .diff import diff
from .errors import PolicyError
from .policy import Policy, profiles
from .snapshot import environment_snapshot, snapshot_from_pip_report


def _show(policy: Policy) -> str:
    lines = [f"{policy.name}: {policy.description}" if policy.description else policy.name]
    if policy.source:
        lines.append(f"  from {policy.source}")
    for index, rule in enumerate(policy.rules):
        reason = f"  # {rule.reason}" if rule.reason else ""
        lines.append(f"  rule {index}: {rule.describe()}{reason}")
    lines.append(f"  default: {policy.default.value}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="which confinement layers this kernel supports (probes a child process)")
    commands.add_parser("profiles", help="list the shipped profiles")
    show = commands.add_parser("show", help="print a policy's rules")
    show.add_argument("policy", help="profile name or path of a .toml policy / .json snapshot")
    compare = commands.add_parser("diff", help="where two policies disagree")
    compare.add_argument("first")
    compare.add_argument("second")
    audit = commands.add_parser("audit", help="run a script and list what a server profile would refuse")
    audit.add_argument("--profile", required=True, help="the server profile to audit against")
    audit.add_argument("script", help="path of the Python script to run")
    audit.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    snapshot = commands.add_parser("snapshot", help="write an environment snapshot (JSON) for Policy.from_environment")
    snapshot.add_argument("--name", default="environment", help="the snapshot's (and policy's) name")
    snapshot.add_argument("--description", default="", help="one line saying what environment this is")
    snapshot.add_argument("--pip-report", help="a `pip install --dry-run --report` file to describe instead of this interpreter")
    snapshot.add_argument("--python-version", help="with --pip-report: the Python version the resolve targeted")
    snapshot.add_argument("--pip-command", default="", help="with --pip-report: the pip command, recorded in the snapshot")
    snapshot.add_argument("-o", "--output", help="write here instead of standard output")
    args = parser.parse_args(argv)

    try:
        if args.command == "check":
            result = check()
            print(result)
            return 0 if result.all_available else 1
        if args.command == "profiles":
            for name in profiles():
                print(f"{name:<16} {Policy.load(name).description}")
            return 0
        if args.command == "show":
            print(_show(Policy.load(args.policy)))
            return 0
        if args.command == "diff":
            report = diff(args.first, args.second)
            print(report)
            return 0
        if args.command == "audit":
            report = audit_script(args.script, args.profile, tuple(args.args))
            print(report)
            return 2 if report.error else (0 if report.clean else 1)
        if args.pip_report:
            if not args.python_version:
                parser.error("--pip-report needs --python-version (the version the resolve targeted)")
            data = snapshot_from_pip_report(
                args.pip_report, python_version=args.python_version, name=args.name, command=args.pip_command
            )
        else:
            data = environment_snapshot(args.name)
        if args.description:
            data["description"] = args.description
        text = json.dumps(data, indent=1) + "\n"
        if args.output:
            Path(args.output).write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
        return 0
    except (PolicyError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
