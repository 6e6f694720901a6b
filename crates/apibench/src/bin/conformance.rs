//! `conformance`: runs upstream's e2e suite (an `e2e.test` built from a Kubernetes tree, see
//! `scripts/conformance`) against a Tugboat cluster of real nodes on this machine. In network,
//! mount and pid namespaces of its own it makes `--nodes` hosts on a switch (network
//! namespaces), starts `tugboat server` on the first and joins the others with `tugboat agent`
//! and the printed token, puts the suite's images (made here, below) into every node's image
//! dir before its kubelet starts, waits for every node to be Ready, then runs `e2e.test` in the
//! first host with the arguments after `--` and the admin kubeconfig. Its JUnit report goes to
//! `--report-dir`; the exit code is the suite's.
//!
//! Images: the names `e2e.test --list-images` prints, each an OCI archive made from what this
//! machine has: agnhost (built from the same tree) on a busybox layer with this machine's bash
//! (its `sh`), curl, netcat, dig and getent, as upstream's is on a small distribution; pause
//! (upstream's pause.c, built statically); busybox (built from upstream's source when given);
//! the web servers (nginx, httpd) as busybox's httpd on port 80 serving their document root
//! with its index page where theirs is; the update-demo images (agnhost's test-webserver with
//! their `data.json`); nonewprivs (built from the same tree, setuid); the sample API server
//! (built from the same tree) and etcd (this machine's, with its shared libraries) for the
//! Aggregator spec; every other image as agnhost, a stand-in for a test that needs a running
//! process only.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use tugboat_testkit::hosts::{Host, Hosts};
use tugboat_testkit::image;

#[derive(Debug, Parser)]
#[command(about = "Run upstream's e2e suite against a Tugboat cluster of real nodes on this machine")]
struct Args {
    /// The tugboat binary the nodes run.
    #[arg(long)]
    tugboat: PathBuf,
    /// The e2e.test binary.
    #[arg(long)]
    e2e: PathBuf,
    /// The agnhost binary (static), built from the same tree.
    #[arg(long)]
    agnhost: PathBuf,
    /// The pause binary (static).
    #[arg(long)]
    pause: PathBuf,
    /// The nonewprivs program (static), built from the same tree (`test/images/nonewprivs`):
    /// its image has it setuid root, as upstream's. Without it, that image is an agnhost
    /// stand-in.
    #[arg(long)]
    nnp: Option<PathBuf>,
    /// The resource consumer (static, `test/images/resource-consumer`) and its CPU burner
    /// (`consume-cpu`), built from the same tree: the resource-consumer image the autoscaling
    /// specs load, as upstream's (`/consumer`, `/consume-cpu/consume-cpu`). Without them,
    /// that image is an agnhost stand-in.
    #[arg(long)]
    consumer: Option<PathBuf>,
    #[arg(long)]
    consume_cpu: Option<PathBuf>,
    /// A static busybox built from upstream's source (the version upstream's busybox image
    /// has, 1.36.1): the busybox image's. Without it, Debian's, with bash as its `sh`.
    #[arg(long)]
    busybox: Option<PathBuf>,
    /// agnhost's source directory in the tree (`test/images/agnhost`), whose porter certificate
    /// the image carries as `/localhost.crt` and `/localhost.key`, as upstream's does.
    #[arg(long)]
    agnhost_src: Option<PathBuf>,
    /// The sample API server (static), built from the same tree (`k8s.io/sample-apiserver`):
    /// the Aggregator spec's image. Without it, that image is an agnhost stand-in.
    #[arg(long)]
    sample_apiserver: Option<PathBuf>,
    /// An etcd binary (the sample API server's sidecar), with the shared libraries it needs
    /// (`ldd`). Without it, that image is an agnhost stand-in.
    #[arg(long)]
    etcd: Option<PathBuf>,
    /// Nodes in the cluster: the server and `nodes - 1` agents.
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Where e2e.test writes its JUnit report.
    #[arg(long)]
    report_dir: PathBuf,
    /// Where to copy the nodes' logs after the run (none if not given).
    #[arg(long)]
    logs_dir: Option<PathBuf>,
    /// Run the specs in this many parallel processes through the ginkgo CLI (`--ginkgo`), as
    /// upstream's CI does; 1 runs e2e.test directly.
    #[arg(long, default_value_t = 1)]
    procs: usize,
    /// The ginkgo CLI, built from the same tree (needed when `--procs` is above 1).
    #[arg(long)]
    ginkgo: Option<PathBuf>,
    /// e2e.test's own arguments (`--ginkgo.focus=…`).
    #[arg(last = true)]
    e2e_args: Vec<String>,
}

/// The host's programs agnhost's image carries, as upstream's (a small distribution with
/// bash, curl, OpenBSD netcat, dig and getent): `(host path, path in the image)`. The suite's
/// commands need them as they are — `sh -c 'echo hostName | nc -v -t -w 2 <svc> 80'`, UDP
/// through `nc -u`, `dig +search`, `getent hosts` — and Debian's busybox cannot stand in:
/// its `sh` runs its own applets before `PATH` (SH_STANDALONE), and its `nc` knows none of
/// OpenBSD netcat's flags. `scripts/conformance` installs the packages that hold them.
const AGNHOST_TOOLS: &[(&str, &str)] = &[
    ("/usr/bin/bash", "bin/bash"),
    ("/usr/bin/curl", "usr/bin/curl"),
    ("/bin/nc.openbsd", "usr/bin/nc"),
    ("/usr/bin/dig", "usr/bin/dig"),
    ("/usr/bin/getent", "usr/bin/getent"),
];

/// What an image's layer holds besides busybox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    /// agnhost at `/agnhost`.
    Agnhost,
    /// pause at `/pause`.
    Pause,
    /// The busybox image: busybox built from upstream's source (`--busybox`), as upstream's
    /// image is; without it, Debian's with this machine's bash as its `sh`, since Debian's
    /// `sh` drops variables whose names are not a shell's (`data-1`, from `envFrom`) from what
    /// it passes on, where upstream's keeps them.
    Busybox,
    /// A web server's document root with its index page (served by busybox's httpd), as the
    /// tests that break a server by moving its index page (readiness) need a real one.
    Web { root: &'static str, page: &'static str },
    /// The sample API server at `/kube-sample-apiserver`, as upstream's image has it.
    SampleApiServer,
    /// An update-demo image (`nautilus`, `kitten`): agnhost's test-webserver serving the
    /// image's `html/` files (`data.json` and its picture) from `/`, as upstream's.
    UpdateDemo(&'static str),
    /// etcd at `/usr/local/bin/etcd`, with its shared libraries.
    Etcd,
    /// nonewprivs at `/usr/local/bin/nnp`, setuid root: it prints its effective uid.
    Nnp,
    /// The resource consumer at `/consumer`, which runs `./consume-cpu/consume-cpu` from `/`.
    ResourceConsumer,
}

/// How an image of the suite is made here: its entrypoint, command and layer. `None` for the
/// images the suite expects a pull of to fail.
type Recipe = (&'static [&'static str], &'static [&'static str], Layer);

fn recipe(args: &Args, name: &str) -> Option<Recipe> {
    if name.starts_with("invalid.") || name.contains("authenticated-image-pulling") || name.contains("windows") {
        return None;
    }
    let repository = name.rsplit_once(':').map(|(r, _)| r).unwrap_or(name);
    let base = repository.rsplit('/').next().unwrap_or(repository);
    Some(match base {
        "agnhost" => (&["/agnhost"], &["pause"], Layer::Agnhost),
        "pause" => (&["/pause"], &[], Layer::Pause),
        "busybox" => (&[], &["sh"], Layer::Busybox),
        "httpd" => (
            &["/bin/httpd", "-f", "-p", "80", "-h", "/usr/local/apache2/htdocs"],
            &[],
            Layer::Web { root: "usr/local/apache2/htdocs", page: "<html><body><h1>It works!</h1></body></html>\n" },
        ),
        "nginx" => (
            &["/bin/httpd", "-f", "-p", "80", "-h", "/usr/share/nginx/html"],
            &[],
            Layer::Web {
                root: "usr/share/nginx/html",
                page: "<!DOCTYPE html>\n<html>\n<head>\n<title>Welcome to nginx!</title>\n</head>\n<body>\n<h1>Welcome to nginx!</h1>\n</body>\n</html>\n",
            },
        ),
        "nautilus" if args.agnhost_src.is_some() => (&["/agnhost"], &["test-webserver"], Layer::UpdateDemo("nautilus")),
        "kitten" if args.agnhost_src.is_some() => (&["/agnhost"], &["test-webserver"], Layer::UpdateDemo("kitten")),
        "sample-apiserver" if args.sample_apiserver.is_some() => {
            (&["/kube-sample-apiserver"], &[], Layer::SampleApiServer)
        }
        "etcd" if args.etcd.is_some() => (&["/usr/local/bin/etcd"], &[], Layer::Etcd),
        "nonewprivs" if args.nnp.is_some() => (&[], &["nnp"], Layer::Nnp),
        "resource-consumer" if args.consumer.is_some() && args.consume_cpu.is_some() => {
            (&["/consumer"], &[], Layer::ResourceConsumer)
        }
        _ => (&["/agnhost"], &["pause"], Layer::Agnhost),
    })
}

/// Dynamically linked programs (`(host path, path in the image)`) with the shared libraries
/// `ldd` names, each once, as layer entries (`(path in the image, contents)`).
fn with_libraries(programs: &[(&Path, &str)]) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for (program, at) in programs {
        let data = std::fs::read(program).with_context(|| format!("reading {}", program.display()))?;
        files.push((at.to_string(), data));
        let ldd = Command::new("ldd").arg(program).output().context("ldd")?;
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or `/lib64/ld-linux-x86-64.so.2 (0x…)`.
            let path = line.split("=>").last().unwrap_or_default().split_whitespace().next().unwrap_or_default();
            let at = path.trim_start_matches('/');
            if path.starts_with('/') && !files.iter().any(|(known, _)| known == at) {
                let data = std::fs::read(path).with_context(|| format!("reading {path}"))?;
                files.push((at.to_string(), data));
            }
        }
    }
    Ok(files)
}

/// Writes one archive per recipe into `dir`, holding every image name made so.
fn make_images(args: &Args, names: &[String], dir: &Path) -> anyhow::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let agnhost = std::fs::read(&args.agnhost).with_context(|| format!("reading {}", args.agnhost.display()))?;
    let pause = std::fs::read(&args.pause).with_context(|| format!("reading {}", args.pause.display()))?;
    let porter = |file: &str| -> anyhow::Result<Vec<u8>> {
        match &args.agnhost_src {
            Some(dir) => std::fs::read(dir.join("porter").join(file)).with_context(|| format!("reading porter/{file}")),
            None => Ok(Vec::new()),
        }
    };
    let (certificate, key) = (porter("localhost.crt")?, porter("localhost.key")?);
    let programs: Vec<(&Path, &str)> = AGNHOST_TOOLS.iter().map(|(host, at)| (Path::new(*host), *at)).collect();
    let tools = with_libraries(&programs)?;
    let shell = with_libraries(&[(Path::new("/usr/bin/bash"), "bin/bash")])?;
    let mut groups: Vec<(Recipe, Vec<&str>)> = Vec::new();
    for name in names {
        let Some(recipe) = recipe(args, name) else { continue };
        match groups.iter_mut().find(|(r, _)| *r == recipe) {
            Some((_, members)) => members.push(name),
            None => groups.push((recipe, vec![name])),
        }
    }
    let mut made = 0;
    for (i, ((entrypoint, cmd, layer), members)) in groups.iter().enumerate() {
        let layer = match layer {
            // As upstream's image: agnhost-2 (a spec overrides the command with it), the
            // porter's certificate, and curl (here a stand-in over busybox's wget: hooks and
            // probes of the suite run `curl <url>`).
            Layer::Agnhost => {
                let mut entries: Vec<(&str, &[u8], u32)> = vec![
                    ("agnhost", &agnhost, 0o755),
                    ("agnhost-2", b"agnhost", 0o120777),
                    ("bin/sh", b"bash", 0o120777),
                    ("bin/nc", b"/usr/bin/nc", 0o120777),
                    ("etc/nsswitch.conf", b"hosts: files dns\n", 0o644),
                    ("localhost.crt", &certificate, 0o644),
                    ("localhost.key", &key, 0o600),
                ];
                entries.extend(tools.iter().map(|(path, data)| (path.as_str(), data.as_slice(), 0o755)));
                image::busybox_layer(&entries)?
            }
            Layer::Pause => image::busybox_layer(&[("pause", &pause, 0o755)])?,
            Layer::Busybox => match &args.busybox {
                Some(busybox) => image::busybox_layer_of(busybox, &[])?,
                None => {
                    let mut entries: Vec<(&str, &[u8], u32)> = vec![("bin/sh", b"bash", 0o120777)];
                    entries.extend(shell.iter().map(|(path, data)| (path.as_str(), data.as_slice(), 0o755)));
                    image::busybox_layer(&entries)?
                }
            },
            Layer::Web { root, page } => {
                image::busybox_layer(&[(&format!("{root}/index.html"), page.as_bytes(), 0o644)])?
            }
            Layer::UpdateDemo(name) => {
                let html = args.agnhost_src.as_deref().expect("the recipe needs it").join("..").join(name).join("html");
                let data =
                    std::fs::read(html.join("data.json")).with_context(|| format!("reading {name}/html/data.json"))?;
                let picture = format!("{name}.jpg");
                let jpeg =
                    std::fs::read(html.join(&picture)).with_context(|| format!("reading {name}/html/{picture}"))?;
                image::busybox_layer(&[
                    ("agnhost", &agnhost, 0o755),
                    ("data.json", &data, 0o644),
                    (&picture, &jpeg, 0o644),
                ])?
            }
            Layer::SampleApiServer => {
                let path = args.sample_apiserver.as_deref().expect("the recipe needs it");
                let binary = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                image::busybox_layer(&[("kube-sample-apiserver", &binary, 0o755)])?
            }
            Layer::Nnp => {
                let path = args.nnp.as_deref().expect("the recipe needs it");
                let binary = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                image::busybox_layer(&[("usr/local/bin/nnp", &binary, 0o4755)])?
            }
            Layer::ResourceConsumer => {
                let read = |path: &Option<PathBuf>| -> anyhow::Result<Vec<u8>> {
                    let path = path.as_deref().expect("the recipe needs it");
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
                };
                let (consumer, burner) = (read(&args.consumer)?, read(&args.consume_cpu)?);
                image::busybox_layer(&[("consumer", &consumer, 0o755), ("consume-cpu/consume-cpu", &burner, 0o755)])?
            }
            Layer::Etcd => {
                let etcd = args.etcd.as_deref().expect("the recipe needs it");
                let files = with_libraries(&[(etcd, "usr/local/bin/etcd")])?;
                let entries: Vec<(&str, &[u8], u32)> =
                    files.iter().map(|(path, data)| (path.as_str(), data.as_slice(), 0o755)).collect();
                image::busybox_layer(&entries)?
            }
        };
        image::oci_archive_with(&dir.join(format!("e2e-{i}.tar")), members, &layer, entrypoint, cmd)?;
        made += members.len();
    }
    Ok(made)
}

/// `tugboat <args>` on `host`, with the host's data dir, pod logs and node name.
fn tugboat(args: &Args, host: &Host, rest: &[&str]) -> Command {
    let data = host.dir().join("data");
    let mut command = host.command(&args.tugboat);
    command.args(rest).arg("--data-dir").arg(&data).arg("--pod-log-dir").arg(data.join("pods"));
    command.args(["--node-name", host.name()]);
    command
}

fn kubectl(host: &Host, kubeconfig: &Path, args: &[&str]) -> String {
    let out = host.command("/usr/bin/kubectl").args(args).env("KUBECONFIG", kubeconfig).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).to_string()).unwrap_or_default()
}

fn run(args: Args) -> anyhow::Result<u8> {
    let listed = Command::new(&args.e2e).arg("--list-images").output().context("e2e.test --list-images")?;
    let names: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.is_empty() {
        bail!("e2e.test --list-images listed nothing");
    }
    let mut hosts = Hosts::new(args.nodes.max(1))?;
    // Made once, copied to the other nodes.
    let first = hosts.get(0).dir().join("data/images");
    let made = make_images(&args, &names, &first)?;
    for i in 1..hosts.len() {
        let dir = hosts.get(i).dir().join("data/images");
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&first)? {
            let entry = entry?;
            std::fs::copy(entry.path(), dir.join(entry.file_name()))?;
        }
    }
    eprintln!("{made} of the suite's {} images made for each of {} nodes", names.len(), hosts.len());
    let server = hosts.get_mut(0);
    let command = tugboat(&args, server, &["server"]);
    server.spawn("server", command)?;
    let kubeconfig = hosts.get(0).dir().join("data/admin.kubeconfig");
    let deadline = Instant::now() + Duration::from_secs(60);
    let join = loop {
        let log = hosts.get(0).log("server");
        if let Some(line) = log.lines().find(|l| l.trim_start().starts_with("tugboat agent --server")) {
            break line.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        }
        if Instant::now() > deadline {
            bail!("the server printed no join command:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for i in 1..hosts.len() {
        let host = hosts.get_mut(i);
        let rest: Vec<&str> = join[1..].iter().map(String::as_str).collect();
        let command = tugboat(&args, host, &rest);
        host.spawn("agent", command)?;
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let ready = kubectl(
            hosts.get(0),
            &kubeconfig,
            &["get", "nodes", "-o", "jsonpath={.items[*].status.conditions[?(@.type==\"Ready\")].status}"],
        );
        if ready.split_whitespace().filter(|s| *s == "True").count() == hosts.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!("not every node is Ready: {ready:?}\n{}", hosts.get(0).log("server"));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!("{}", kubectl(hosts.get(0), &kubeconfig, &["get", "nodes", "-o", "wide"]));
    std::fs::create_dir_all(&args.report_dir)?;
    let started = Instant::now();
    let mut suite = match (&args.ginkgo, args.procs) {
        (Some(ginkgo), procs) if procs > 1 => {
            // The CLI takes the `--ginkgo.` flags as its own and passes the rest after `--`.
            let (own, rest): (Vec<&String>, Vec<&String>) =
                args.e2e_args.iter().partition(|a| a.starts_with("--ginkgo."));
            let mut command = hosts.get(0).command(ginkgo);
            command
                .arg(format!("--procs={procs}"))
                .args(own.iter().map(|a| a.replacen("--ginkgo.", "--", 1)))
                .arg(&args.e2e)
                .arg("--")
                .args(rest);
            command
        }
        (None, procs) if procs > 1 => bail!("--procs {procs} needs --ginkgo"),
        _ => {
            let mut command = hosts.get(0).command(&args.e2e);
            command.args(&args.e2e_args);
            command
        }
    };
    let status = suite
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--provider", "skeleton", "--report-dir"])
        .arg(&args.report_dir)
        .env("KUBECONFIG", &kubeconfig)
        .stdin(Stdio::null())
        .status()
        .context("running e2e.test")?;
    eprintln!("e2e.test ended after {:.0} s: {status}", started.elapsed().as_secs_f64());
    if let Some(dir) = &args.logs_dir {
        std::fs::create_dir_all(dir)?;
        for i in 0..hosts.len() {
            let host = hosts.get(i);
            for label in ["server", "agent"] {
                let log = host.log(label);
                if !log.is_empty() {
                    std::fs::write(dir.join(format!("{}-{label}.log", host.name())), log)?;
                }
            }
        }
    }
    Ok(status.code().unwrap_or(1).clamp(0, 255) as u8)
}

fn main() -> ExitCode {
    if let Some(code) = tugboat_apibench::isolate() {
        return code;
    }
    let args = Args::parse();
    match run(args) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
