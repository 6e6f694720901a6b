//! `tugboat install` / `uninstall`, under a --root of the test's own (systemd is not touched
//! there): the unit files' content, idempotence, what uninstall and --purge remove.

use std::path::Path;
use std::process::Command;

const TUGBOAT: &str = env!("CARGO_BIN_EXE_tugboat");

fn tugboat(args: &[&str]) -> (bool, String) {
    let out = Command::new(TUGBOAT).args(args).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The section names of an ELF file (binutils' readelf).
fn elf_sections(path: &Path) -> Vec<String> {
    let out = Command::new("readelf").args(["-S", "-W"]).arg(path).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| Some(line.split_once(']')?.1.split_whitespace().next()?.to_string()))
        .collect()
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn install_writes_units_once_and_uninstall_removes_them() {
    // --purge deletes the node bridge: only in a network namespace of the test's own.
    if !tugboat_testkit::isolated("install_writes_units_once_and_uninstall_removes_them") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    let server_flags = ["--data-dir", "/srv/tugboat", "--node-name", "first node", "--token-ttl", "1h"];
    let install_server = |extra: &[&str]| tugboat(&[&["install", "server", "--root", r, "--"][..], extra].concat());
    let (ok, said) = install_server(&server_flags);
    assert!(ok, "{said}");
    assert!(said.contains("systemd is not running here"), "{said}");
    let binary = root.path().join("usr/local/bin/tugboat");
    assert_eq!(mode(&binary), 0o755);
    // Installed stripped: no debug info, no symbol table, a link to where the debug info goes;
    // and it still runs.
    let (installed, built) = (std::fs::metadata(&binary).unwrap().len(), std::fs::metadata(TUGBOAT).unwrap().len());
    assert!(installed * 3 < built, "{installed} bytes installed of {built}: not stripped");
    let sections = elf_sections(&binary);
    assert!(!sections.iter().any(|s| s == ".debug_info" || s == ".debug_line" || s == ".symtab"), "{sections:?}");
    assert!(sections.iter().any(|s| s == ".gnu_debuglink"), "{sections:?}");
    let version = Command::new(&binary).arg("--version").output().unwrap();
    assert!(version.status.success(), "{version:?}");
    let debug_file = root.path().join("usr/lib/debug/usr/local/bin/tugboat.debug");
    assert!(!debug_file.exists(), "debug info only with --debug-info");
    let unit_path = root.path().join("etc/systemd/system/tugboat.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    assert!(
        unit.contains(
            "ExecStart=/usr/local/bin/tugboat server --data-dir /srv/tugboat --node-name \"first node\" --token-ttl 1h\n"
        ),
        "{unit}"
    );
    for line in ["[Install]\nWantedBy=multi-user.target", "KillMode=process", "Delegate=yes", "Restart=always"] {
        assert!(unit.contains(line), "{line}: {unit}");
    }

    // Again: nothing changes.
    let (ok, said) = install_server(&server_flags);
    assert!(ok && said.contains("unchanged") && !said.contains("installed"), "{said}");
    // With --debug-info, the debug info goes apart, where debuggers look for it.
    let (ok, said) = tugboat(&[&["install", "server", "--root", r, "--debug-info", "--"][..], &server_flags].concat());
    assert!(ok && said.contains("tugboat.debug"), "{said}");
    assert!(elf_sections(&debug_file).iter().any(|s| s == ".debug_info"));
    let (ok, said) = install_server(&server_flags);
    assert!(ok && !debug_file.exists(), "{said}");
    assert_eq!(std::fs::read_to_string(&unit_path).unwrap(), unit);
    // Other flags: the unit is rewritten.
    let (ok, said) = install_server(&["--data-dir", "/srv/tugboat"]);
    assert!(ok && said.contains("wrote"), "{said}");
    assert!(!std::fs::read_to_string(&unit_path).unwrap().contains("first node"));

    // The agent: its token goes into an environment file only root reads.
    let token = "abcdef.0123456789abcdef";
    let (ok, said) =
        tugboat(&["install", "agent", "--root", r, "--", "--server", "https://10.0.0.1:6443", "--token", token]);
    assert!(ok, "{said}");
    let agent = std::fs::read_to_string(root.path().join("etc/systemd/system/tugboat-agent.service")).unwrap();
    assert!(agent.contains("ExecStart=/usr/local/bin/tugboat agent --server https://10.0.0.1:6443\n"), "{agent}");
    assert!(agent.contains("EnvironmentFile=-/etc/tugboat/tugboat-agent.env") && !agent.contains(token), "{agent}");
    let env = root.path().join("etc/tugboat/tugboat-agent.env");
    assert_eq!(std::fs::read_to_string(&env).unwrap(), format!("TUGBOAT_TOKEN={token}\n"));
    assert_eq!(mode(&env), 0o600);

    // Uninstall removes what install wrote and keeps the data.
    let data = root.path().join("srv/tugboat");
    std::fs::create_dir_all(data.join("db")).unwrap();
    let (ok, said) = tugboat(&["uninstall", "--root", r]);
    assert!(ok, "{said}");
    for gone in [&binary, &unit_path, &env] {
        assert!(!gone.exists(), "{} stays", gone.display());
    }
    assert!(!root.path().join("etc/systemd/system/tugboat-agent.service").exists());
    assert!(data.exists(), "no --purge: the data stays");
    let (ok, said) = tugboat(&["uninstall", "--root", r]);
    assert!(!ok && said.contains("nothing to uninstall"), "{said}");

    // --purge: the data dirs and the node bridge go too.
    let (ok, said) = install_server(&["--data-dir", "/srv/tugboat"]);
    assert!(ok, "{said}");
    let link = |args: &[&str]| Command::new("ip").args(args).status().unwrap().success();
    assert!(link(&["link", "add", "tugboat0", "type", "bridge"]));
    let nft = |args: &[&str]| Command::new("nft").args(args).status().unwrap().success();
    assert!(nft(&["add", "table", "ip", "tugboat-nat"]));
    assert!(nft(&["add", "table", "ip", "someone-else"]));
    let (ok, said) = tugboat(&["uninstall", "--root", r, "--purge"]);
    assert!(ok, "{said}");
    assert!(!data.exists(), "{said}");
    assert!(!link(&["link", "show", "tugboat0"]), "the bridge stays: {said}");
    assert!(!nft(&["list", "table", "ip", "tugboat-nat"]), "the node's table stays: {said}");
    assert!(nft(&["list", "table", "ip", "someone-else"]), "another table went too: {said}");
    assert!(!root.path().join("etc/tugboat").exists());
}
