//! What a user builds and runs besides the agent's code: the container image (`Dockerfile`) and
//! the test command (README.md, `scripts/test`, `.ci/run`).
//!
//! No docker daemon runs in CI, so the Dockerfile's dependency layer (the steps before
//! `COPY . .`: the workspace's manifests and stub targets) is replayed here in a temporary
//! directory and cargo reads the result with `--locked`: a workspace member, a manifest or a
//! target the stubs miss fails this test, not a user's `docker build`.

use crate::manifests::{listen_port, repo, run, text};

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// The Dockerfile's instructions as (instruction, arguments), comments dropped and
/// continuation lines joined.
fn instructions() -> Vec<(String, String)> {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let mut out = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines().map(str::trim) {
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head.trim_end());
                current.push(' ');
            }
            None => {
                current.push_str(line);
                let (op, args) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((op.to_owned(), args.trim().to_owned()));
                current.clear();
            }
        }
    }
    out
}

const BUILD: &str = "cargo build --release --locked --bin druid-log-agent";

#[test]
fn dockerfile_builds_and_runs_what_the_manifests_expect() {
    let steps = instructions();
    let has = |op: &str, args: &str| steps.iter().any(|(o, a)| o == op && a == args);
    let rust = env!("CARGO_PKG_RUST_VERSION");
    assert!(
        steps
            .iter()
            .any(|(o, a)| o == "FROM" && a.starts_with(&format!("rust:{rust}-"))),
        "the builder uses Cargo.toml's rust-version {rust}"
    );
    // The agent only, once on the stubs (the dependency layer), once on the sources.
    let builds: Vec<&str> = steps
        .iter()
        .filter(|(o, a)| o == "RUN" && a.contains("cargo "))
        .map(|(_, a)| a.as_str())
        .collect();
    assert_eq!(builds, [BUILD, BUILD]);
    assert!(has("FROM", "debian:bookworm-slim"));
    assert!(has(
        "COPY",
        "--from=builder /src/target/release/druid-log-agent /usr/local/bin/druid-log-agent"
    ));
    assert!(has("ENTRYPOINT", r#"["druid-log-agent"]"#));
    assert!(has("CMD", r#"["run"]"#));
    assert!(has("EXPOSE", &listen_port().to_string()));
    assert!(
        has("USER", "0:0"),
        "the image runs as root like the DaemonSet (runAsUser: 0)"
    );
}

/// Every file under `dir`, relative to it.
fn files(dir: &Path, base: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            files(&p, base, out);
        } else {
            out.push(p.strip_prefix(base).unwrap().to_owned());
        }
    }
}

#[test]
fn dockerfile_dependency_layer_is_what_cargo_needs() {
    let steps = instructions();
    let from = steps
        .iter()
        .position(|(o, a)| o == "FROM" && a.starts_with("rust:"))
        .expect("the Dockerfile has a rust builder stage");
    let sources = steps
        .iter()
        .position(|(o, a)| o == "COPY" && a == ". .")
        .expect("the builder copies the sources with COPY . .");
    assert!(from < sources);

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut cargo_steps = Vec::new();
    for (op, args) in &steps[from + 1..sources] {
        match op.as_str() {
            "WORKDIR" => {}
            "COPY" => {
                let parts: Vec<&str> = args.split_whitespace().collect();
                let (dest, srcs) = parts.split_last().unwrap();
                let dest = root.join(dest);
                std::fs::create_dir_all(&dest).unwrap();
                for src in srcs {
                    let name = Path::new(src).file_name().unwrap();
                    std::fs::copy(repo().join(src), dest.join(name))
                        .unwrap_or_else(|e| panic!("COPY {src}: {e}"));
                }
            }
            "RUN" if args.starts_with("cargo ") => cargo_steps.push(args.as_str()),
            "RUN" => {
                let out = run(
                    Command::new("sh").arg("-c").arg(args).current_dir(root),
                    b"",
                    "sh runs the Dockerfile's stub commands",
                );
                assert!(out.status.success(), "RUN {args}: {}", text(&out.stderr));
            }
            // A build argument there would rebuild every dependency when its value changes.
            other => panic!("{other} {args} in the dependency layer"),
        }
    }
    assert_eq!(
        cargo_steps,
        [BUILD],
        "the dependency layer builds the agent"
    );

    // COPY keeps the sources' times, older than the stubs' build: unless they are touched,
    // cargo takes the stub's build as fresh and the image ships an empty main.
    let touched = steps[sources + 1..]
        .iter()
        .take_while(|(o, a)| !(o == "RUN" && a == BUILD))
        .any(|(o, a)| {
            o == "RUN"
                && a.starts_with("touch ")
                && a.contains("src/main.rs")
                && a.contains("src/lib.rs")
        });
    assert!(
        touched,
        "the sources are touched between COPY . . and the build"
    );

    // The real sources replace every stub at COPY . . (none ends up in the image's build).
    let mut made = Vec::new();
    files(root, root, &mut made);
    for f in &made {
        assert!(
            repo().join(f).is_file(),
            "the dependency layer makes {}, which the sources do not replace",
            f.display()
        );
    }

    // cargo reads the stub tree as the builder's would: every member's manifest, every target
    // a manifest names, and Cargo.lock as it is (--locked). `fetch` parses all of that and
    // builds nothing; the packages are already here (cargo test fetched them).
    let cargo = env!("CARGO");
    let version = run(Command::new(cargo).arg("-vV"), b"", "cargo runs the tests");
    let host = text(&version.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .expect("cargo -vV names the host");
    let out = run(
        Command::new(cargo)
            .args(["fetch", "--locked", "--offline", "--target", &host])
            .current_dir(root),
        b"",
        "cargo runs the tests",
    );
    assert!(
        out.status.success(),
        "cargo refuses the Dockerfile's dependency layer: {}",
        text(&out.stderr)
    );
    let out = run(
        Command::new(cargo)
            .args(["metadata", "--no-deps", "--format-version", "1"])
            .current_dir(root),
        b"",
        "cargo runs the tests",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let metadata: Value = serde_json::from_slice(&out.stdout).unwrap();
    let bins: Vec<&str> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "druid-log-agent")
        .flat_map(|p| p["targets"].as_array().unwrap())
        .filter(|t| t["kind"] == serde_json::json!(["bin"]))
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        bins,
        ["druid-log-agent"],
        "the stubs give the agent its bin"
    );
}

#[test]
fn ci_runs_the_test_command_of_the_readme() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    // README's first code block: the demo, then the test suite.
    let block = readme
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("README.md starts with a sh block");
    let commands: Vec<&str> = block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(commands.len(), 2, "README's first lines: two commands");
    let test = commands[1];
    let ci = std::fs::read_to_string(repo().join(".ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l.trim() == test),
        ".ci/run must run README's test command {test:?} as it is"
    );
    // It is a script of the repository, runnable as written.
    let script = repo().join(test.split_whitespace().next().unwrap());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&script)
            .unwrap_or_else(|e| panic!("{}: {e}", script.display()))
            .permissions(),
    );
    assert!(mode & 0o111 != 0, "{} is executable", script.display());
}
