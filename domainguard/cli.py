"""The `domainguard` command (DESIGN §8). Errors are formatted here, once.

Exit codes: 0 proved / clean, 1 refuted (findings), 2 bad input or usage, 3 inconclusive.
``--json`` puts machine output alone on stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import BundleError, DomainGuardError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compile domain policies into proved attention masks, kernels and certified models.")
out = Console(highlight=False, soft_wrap=True)  # long paths and witnesses stay on one line (grep, CI logs)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT = {"PROVED": 0, "REFUTED": 1, "UNKNOWN": 3}
STYLE = {"PROVED": "bold green", "REFUTED": "bold red", "UNKNOWN": "bold yellow"}


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        out.print(f"domainguard {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print domainguard's version and exit."),
):
    """Compile domain policies into proved attention masks, kernels and certified models."""


class _Fail(Exception):
    def __init__(self, error: DomainGuardError, as_json: bool):
        self.error, self.as_json = error, as_json


def _emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


# --- shared steps --------------------------------------------------------------------------
def _load(policy_path: str, layers: int | None, profile: str | None):
    from .compiled import compile
    from .parse import load_policy

    policy = load_policy(policy_path)
    return compile(policy, layers=layers, profile=profile, source=policy_path)


def _show_results(verdict, compiled, title: str) -> None:
    out.print(f"[bold]{title}[/]  policy [cyan]{compiled.policy.name}[/]  "
              f"layers {compiled.num_layers if compiled.flow.depth_given else 'any'}"
              f"{'  profile ' + compiled.profile if compiled.profile else ''}")
    table = Table(show_header=True, header_style="bold")
    table.add_column("claim")
    table.add_column("statement")
    table.add_column("verdict")
    table.add_column("method")
    for r in verdict.results:
        table.add_row(r.id, r.statement, f"[{STYLE[r.status.value]}]{r.status.value}[/]", r.method.get("name", ""))
    out.print(table)
    for r in verdict.results:
        for path in r.witness:
            out.print(f"  [red]{r.id}[/] witness: {path}")
        if r.reason:
            out.print(f"  [yellow]{r.id}[/] {r.reason}")
        exp = r.details.get("explanation")
        if exp and exp.get("text"):
            out.print(f"  [cyan]{r.id}[/] relies on {', '.join(exp['relies_on'])}; {exp['text']}")
        loc = r.details.get("location")
        if loc and r.status.value != "PROVED":
            out.print(f"  [dim]{loc['file']}:{loc['line']}:{loc['column']}[/]")
    for f in verdict.findings:
        out.print(f"  [yellow]finding {f['code']}[/]: {f['message']}")
    if verdict.suggestion:
        out.print(f"  [cyan]suggest[/]: {verdict.suggestion.get('text') or verdict.suggestion.get('reason')}")
    out.print(f"verdict: [{STYLE[verdict.status.value]}]{verdict.status.value}[/]")


def _verdict_json(verdict, compiled) -> dict:
    return {
        "status": verdict.status.value,
        "policy": compiled.policy.name,
        "scope": {"layers": compiled.num_layers if compiled.flow.depth_given else "any", "profile": compiled.profile},
        "claims": [r.to_claim() for r in verdict.results],
        "findings": list(verdict.findings),
        "reach": verdict.reach,
        "suggestion": verdict.suggestion,
    }


def _claim_result(claim: dict):
    """A certificate-shaped claim (translation validation) as a verdict Result."""
    from .verdict import Result, Status

    details = dict(claim.get("details") or {})
    if claim.get("witness"):
        details["witness"] = claim["witness"]
    return Result(id=claim["id"], kind=claim["kind"], statement=claim["statement"], status=Status(claim["status"]),
                  method=dict(claim.get("method") or {}), scope=dict(claim.get("scope") or {}),
                  reason=claim.get("reason"), details=details)


def _artifact_results(path: Path, compiled, cert, problems: list[str], pubkey: str | None) -> list:
    """Checks of a compiled directory or bundle beyond its policy's proofs: signature, files, kernels, tables."""
    from .artifact import kernel_subject, table_claims
    from .verdict import Result, Status

    results = []
    signed = (path / "signature.json").is_file() and not (path / "signature.json").is_symlink()
    if pubkey is not None or signed:
        from .signing import check_signature_integrity, verify_bundle_signature

        # A signature that is there must hold (BundleError, exit 2, names the file); with --pubkey it must
        # also be that key's. Without one, an intact signature shows integrity since signing, not authorship.
        info = verify_bundle_signature(str(path), pubkey) if pubkey is not None else check_signature_integrity(path)
        results.append(Result(
            id="signature", kind="signature", status=Status.PROVED,
            statement=f"Ed25519 signature by key {info.key_id} over the certificate and {info.files} files holds"
                      + ("" if info.authenticated else " (checked against the key it carries: integrity, not authorship)"),
            method={"name": "ed25519"}, scope={"authenticated": info.authenticated}))
    results.append(Result(
        id="artifact", kind="artifact-matches-policy",
        statement="the directory's files and tables are exactly what its policy compiles to",
        status=Status.REFUTED if problems else Status.PROVED,
        method={"name": "digest-and-recompile"}, scope={}, reason="; ".join(problems) or None))
    certified = cert.subject.get("kernels", {}).get("sha256")
    if certified is not None:
        now = kernel_subject(compiled)["sha256"]
        results.append(Result(
            id="kernels", kind="kernels-match-certificate",
            statement="the installed kernels (source and frozen tables) are the certified ones",
            status=Status.PROVED if now == certified else Status.UNKNOWN,
            method={"name": "digest"}, scope={},
            reason=None if now == certified else
            f"kernel digest {now[:12]}… differs from the certified {certified[:12]}… (another domainguard "
            "version?): the tables are re-proved, but the code that enforces them is not the certified code"))
    results += [_claim_result(c) for c in table_claims(compiled)]
    return results


def _certificate_result(path: Path, cert, verdict):
    """Does the certificate claim what was just re-derived? Its verdict must follow from its claims; a
    bundle's must also hold every claim a certification makes (the model's graph audit and leak test are
    not re-run here: their recorded results count)."""
    from .bundle import claim_problems, claims_bundle, stated_problems
    from .certificate import overall
    from .verdict import Result, Status

    if claims_bundle(path, cert.subject):
        problems = claim_problems(cert, verdict)
    elif cert.claims and cert.verdict != overall(cert.claims):
        problems = [f"its verdict {cert.verdict} does not follow from its claims ({overall(cert.claims)})"]
    else:
        problems = []
    problems += stated_problems(cert, verdict)
    return Result(
        id="certificate", kind="certificate-consistent",
        statement="the certificate's verdict follows from its claims, and it holds every claim a certification makes",
        status=Status.REFUTED if problems else Status.PROVED, method={"name": "recorded-claims"}, scope={},
        reason="; ".join(problems) or None)


# --- commands ------------------------------------------------------------------------------
@app.command("compile")
def compile_cmd(
    policy: str = typer.Argument(..., help="Policy YAML file."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Deployment profile."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Model depth (transformer layers)."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Output directory."),
    key: Optional[str] = typer.Option(None, "--key", help="Sign the directory with this Ed25519 private key (PEM)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout."),
):
    """Compile POLICY into per-layer relation tables and a certificate."""
    from .artifact import write_compiled
    from .verdict import Verdict, combine_status
    from .verify import verify

    try:
        compiled = _load(policy, layers, profile)
        verdict = verify(compiled)
        if profile is not None:
            ref = verdict.result(f"profile[{profile}]")
            if ref.status.value != "PROVED":
                if as_json:
                    _emit_json({"status": ref.status.value, "written": None, "claims": [ref.to_claim()]})
                else:
                    err.print(f"[red]refusing to compile profile {profile!r}[/]: {ref.reason}")
                raise typer.Exit(EXIT[ref.status.value])
        target = Path(output or f"{Path(policy).stem}.compiled")
        files, cert = write_compiled(compiled, verdict, target, key=key)
    except DomainGuardError as e:
        raise _Fail(e, as_json) from None
    # The certificate adds translation-validation claims to the policy's: its verdict is the exit code.
    shown = {r.id for r in verdict.results}
    results = verdict.results + tuple(_claim_result(c.model_dump(mode="json")) for c in cert.claims if c.id not in shown)
    verdict = Verdict(combine_status(r.status for r in results), results, verdict.reach, verdict.findings,
                      verdict.suggestion)
    if as_json:
        _emit_json({**_verdict_json(verdict, compiled), "written": str(target), "files": files})
    else:
        _show_results(verdict, compiled, "compile")
        out.print(f"wrote [cyan]{target}[/] ({', '.join(files)}, certificate.json{', signature.json' if key else ''})")
    raise typer.Exit(EXIT[verdict.status.value])


@app.command("verify")
def verify_cmd(
    target: str = typer.Argument(..., help="Policy YAML, compiled directory or bundle."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Deployment profile (a policy only)."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Model depth (a policy only; default: any depth)."),
    suggest: bool = typer.Option(False, "--suggest", help="Also find a maximal set of reads that satisfies every rule."),
    pubkey: Optional[str] = typer.Option(None, "--pubkey", help="Check the bundle's signature with this public key."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout."),
):
    """Prove every forbid rule (or re-check a compiled directory/bundle from scratch)."""
    from .verdict import Verdict, combine_status
    from .verify import verify

    try:
        path = Path(target)
        if path.name == "certificate.json" and path.is_file():
            raise BundleError(f"{path}: give the directory that holds it: domainguard verify {path.parent}",
                              code="DG404")
        if path.is_dir():
            from .artifact import load_dir

            if profile is not None or layers is not None:
                raise BundleError("--profile and --layers are fixed by the compiled directory's certificate",
                                  code="DG404")
            from .bundle import relocate_paths, snapshot

            # Every check reads one private copy: read in place, the signature could be checked on other
            # bytes than the files and proofs before it, if the folder changed in between.
            with snapshot(path) as (copy, odd):
                compiled, cert, problems = load_dir(copy)
                problems = [f"{path / rel}: a link or special file has no place in a certified folder"
                            for rel in odd] + problems
                extra = _artifact_results(copy, compiled, cert, problems, pubkey)
                verdict = verify(compiled, suggest=suggest)
                results = verdict.results + tuple(extra) + (_certificate_result(copy, cert, verdict),)
                verdict = relocate_paths(Verdict(combine_status(r.status for r in results), results, verdict.reach,
                                                 verdict.findings, verdict.suggestion), copy, path)
        else:
            if pubkey is not None:
                raise BundleError("--pubkey needs a compiled directory or bundle", code="DG404")
            compiled = _load(target, layers, profile)
            verdict = verify(compiled, suggest=suggest)
    except DomainGuardError as e:
        raise _Fail(e, as_json) from None
    if as_json:
        _emit_json(_verdict_json(verdict, compiled))
    else:
        _show_results(verdict, compiled, "verify")
    raise typer.Exit(EXIT[verdict.status.value])


@app.command("explain")
def explain_cmd(
    policy: str = typer.Argument(..., help="Policy YAML file."),
    src: str = typer.Option(..., "--from", help="Source domain."),
    dst: str = typer.Option(..., "--to", help="Destination domain."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Model depth (default: any depth)."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Deployment profile."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout."),
):
    """Show whether and how information can flow from one domain to another."""
    from .verify import explain_flow

    try:
        compiled = _load(policy, layers, profile)
        result = explain_flow(compiled, src, dst)
    except DomainGuardError as e:
        raise _Fail(e, as_json) from None
    leaks = result.status.value == "REFUTED"
    if as_json:
        _emit_json({"flows": leaks, **result.to_claim()})
    else:
        if not leaks:
            out.print(f"[green]no information path[/] from {src} to {dst} "
                      f"(layers {compiled.num_layers if compiled.flow.depth_given else 'any'})")
        else:
            out.print(f"[red]information flows[/] from {src} to {dst}:")
            for p in result.witness:
                out.print(f"  {p}")
            exp = result.details.get("explanation", {})
            if exp.get("relies_on"):
                out.print(f"  relies on: {', '.join(exp['relies_on'])}")
                out.print(f"  {exp.get('text', '')}")
    raise typer.Exit(1 if leaks else 0)


@app.command("schema")
def schema_cmd():
    """Print the policy JSON Schema (for YAML editors)."""
    from .policy import json_schema

    _emit_json(json_schema())


@app.command("certify")
def certify_cmd(
    model: str = typer.Option(..., "--model", help="Model directory (Hugging Face format)."),
    policy: str = typer.Option(..., "--policy", help="Policy YAML."),
    profile: Optional[str] = typer.Option(None, "--profile"),
    output: str = typer.Option(..., "-o", "--output", help="Bundle directory to write."),
    key: Optional[str] = typer.Option(None, "--key", help="Sign the bundle with this Ed25519 private key (PEM)."),
):
    """Guard a model, audit and leak-test it, and write a certified bundle."""
    from .bundle import certify_cli

    try:
        code = certify_cli(model, policy, profile, output, key=key)
    except DomainGuardError as e:
        raise _Fail(e, False) from None
    raise typer.Exit(code)


@app.command("report")
def report_cmd(
    target: str = typer.Argument(..., help="Compiled directory or bundle."),
    fmt: Optional[str] = typer.Option(None, "--format",
                                      help="html, pdf, md, json or sarif (default: from -o's suffix, else html)."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Output file (default: stdout for text formats)."),
):
    """Write the audit report for a compiled directory or bundle."""
    from . import report

    try:
        if output:
            report.write_report(target, fmt, output)
        else:
            data = report.render(target, fmt or "html")
            if isinstance(data, bytes):
                raise DomainGuardError("binary format: give -o FILE", code="DG001")
            sys.stdout.write(data if data.endswith("\n") else data + "\n")
    except DomainGuardError as e:
        raise _Fail(e, False) from None


@app.command("keygen")
def keygen_cmd(
    private: str = typer.Argument(..., help="Private key file to write (PEM, mode 0600)."),
    public: Optional[str] = typer.Argument(None, help="Public key file (default: PRIVATE.pub)."),
):
    """Write a new Ed25519 key pair for signing certificates (never overwrites a file)."""
    from .signing import generate_keypair, key_id, load_public_key

    try:
        priv, pub = generate_keypair(private, public)
    except DomainGuardError as e:
        raise _Fail(e, False) from None
    out.print(f"wrote [cyan]{priv}[/] (keep it secret) and [cyan]{pub}[/] (publish it); key id "
              f"{key_id(load_public_key(pub))}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, format DomainGuardErrors once, map them to exit code 2."""
    try:
        rv = app(args=argv, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except _Fail as f:
        e = f.error
        if f.as_json:
            _emit_json(e.to_dict())
        err.print(str(e), markup=False)
        return e.exit_code
    except DomainGuardError as e:
        err.print(str(e), markup=False)
        return e.exit_code
    except Exception as e:
        # Usage errors from the (vendored) click layer: shown once, exit 2.
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            return 2
        if type(e).__name__ == "Abort":
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
