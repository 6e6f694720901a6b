//! `tugboat`: Kubernetes in one binary. This file only parses flags and calls the components.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tugboat_apiserver::ApiServerConfig;
use tugboat_store::{CompactionPolicy, DatastoreConfig, open_datastore, spawn_compactor};

mod agent;
mod balancer;
mod install;
mod leader;
mod snapshot;

/// mimalloc rather than glibc's malloc: the API server lives on JSON values, whose many small
/// allocations cost glibc about a quarter of the server's CPU under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "tugboat", version, about = "Kubernetes in one small, fast binary")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane: the store (with compaction), the API server, the scheduler, the
    /// controller manager, and the node agent (kubelet) that runs this host's pods.
    Server(ServerArgs),
    /// Run the API server alone.
    Apiserver(ServerArgs),
    /// Run the scheduler alone, against the API server of a kubeconfig.
    Scheduler(SchedulerArgs),
    /// Run the controller manager alone.
    ControllerManager(ControllerManagerArgs),
    /// Run simulated nodes: they register, heartbeat and "run" their pods without containers.
    HollowNodes(HollowArgs),
    /// Run the node agent alone: registers this host as a Node, heartbeats and runs the pods
    /// bound to it.
    Kubelet(KubeletArgs),
    /// Run the service proxy alone: programs this host's nftables so that Services' ClusterIPs,
    /// NodePorts and external IPs reach their ready endpoints.
    Proxy(ProxyArgs),
    /// Join this host to a cluster as a node (`tugboat server` prints the command), then run
    /// its node agent.
    Agent(agent::AgentArgs),
    /// Manage the node's images.
    #[command(subcommand)]
    Images(ImagesCommand),
    /// Manage bootstrap tokens, which join nodes (`tugboat agent --token`).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Install Tugboat as a systemd service: `tugboat install server -- --flags…` or
    /// `tugboat install agent -- --server URL --token TOKEN`.
    Install(install::InstallArgs),
    /// Remove what `tugboat install` installed (`--purge`: the data too).
    Uninstall(install::UninstallArgs),
    /// Save the cluster's store to a file, or restore a data dir from one.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// The per-container monitor (started by the kubelet, not by hand).
    #[command(hide = true)]
    Shim {
        /// The container's directory.
        dir: PathBuf,
    },
    /// Runs a command in a running container (started by the kubelet for exec and probes).
    #[command(hide = true)]
    ExecIn {
        /// The container's directory.
        dir: PathBuf,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a token and print it.
    Create {
        #[command(flatten)]
        api: AdminArgs,
        /// How long it is valid (24h, 90m; 0: for ever).
        #[arg(long, default_value = "24h", value_parser = parse_duration_or_zero)]
        ttl: Duration,
        /// What it is for.
        #[arg(long, default_value = "")]
        description: String,
        /// Print the whole join command, not the token alone.
        #[arg(long)]
        print_join_command: bool,
    },
    /// List the tokens.
    List {
        #[command(flatten)]
        api: AdminArgs,
    },
    /// Delete tokens, by token or by ID.
    Delete {
        #[command(flatten)]
        api: AdminArgs,
        #[arg(required = true)]
        tokens: Vec<String>,
    },
}

/// How `token` commands reach the API: a kubeconfig, else the server's admin one.
#[derive(Debug, clap::Args)]
struct AdminArgs {
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The server's data dir, whose admin.kubeconfig is used without --kubeconfig.
    #[arg(long, default_value = "/var/lib/tugboat", env = "TUGBOAT_DATA_DIR")]
    data_dir: PathBuf,
}

impl AdminArgs {
    fn kubeconfig(&self) -> PathBuf {
        self.kubeconfig.clone().unwrap_or_else(|| self.data_dir.join("admin.kubeconfig"))
    }
}

async fn token(command: TokenCommand) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use kube::api::{Api, DeleteParams, ListParams, PostParams};
    use tugboat_pki::bootstrap as tokens;
    let api = match &command {
        TokenCommand::Create { api, .. } | TokenCommand::List { api } | TokenCommand::Delete { api, .. } => api,
    };
    let kubeconfig = api.kubeconfig();
    let client = client(&kubeconfig).await.with_context(|| format!("reading {}", kubeconfig.display()))?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), tokens::NAMESPACE);
    match command {
        TokenCommand::Create { ttl, description, print_join_command, .. } => {
            let token = tokens::generate();
            let secret =
                tokens::secret(&token, ttl.as_secs(), tokens::unix_now(), &description, &[tokens::NODE_TOKEN_GROUP])
                    .expect("a generated token is well formed");
            secrets.create(&PostParams::default(), &serde_json::from_value(secret)?).await?;
            if print_join_command {
                let maps: Api<ConfigMap> = Api::namespaced(client, tokens::PUBLIC_NAMESPACE);
                let info = maps.get(tokens::CLUSTER_INFO).await?;
                let kubeconfig = info.data.unwrap_or_default().remove("kubeconfig").unwrap_or_default();
                let server = kubeconfig
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("server: "))
                    .ok_or_else(|| anyhow::anyhow!("cluster-info names no server"))?;
                println!("tugboat agent --server {server} --token {token}");
            } else {
                println!("{token}");
            }
        }
        TokenCommand::List { .. } => {
            let now = tokens::unix_now();
            println!("{:<24} {:<10} {:<22} {:<40} DESCRIPTION", "TOKEN", "TTL", "EXPIRES", "USAGES");
            for secret in secrets.list(&ListParams::default()).await? {
                let value = serde_json::to_value(&secret)?;
                if value["type"] != tokens::SECRET_TYPE {
                    continue;
                }
                let field = |k: &str| tokens::field(&value, k).unwrap_or_default();
                let expires = field("expiration");
                let left = time::OffsetDateTime::parse(&expires, &time::format_description::well_known::Rfc3339)
                    .map(|e| e.unix_timestamp() - now);
                let ttl = match left {
                    Ok(s) if s <= 0 => "expired".to_string(),
                    Ok(s) if s >= 3600 => format!("{}h", s / 3600),
                    Ok(s) => format!("{}m", s / 60),
                    Err(_) => "<forever>".to_string(),
                };
                let usages: Vec<&str> = ["authentication", "signing"]
                    .into_iter()
                    .filter(|u| field(&format!("usage-bootstrap-{u}")) == "true")
                    .collect();
                println!(
                    "{:<24} {:<10} {:<22} {:<40} {}",
                    format!("{}.{}", field("token-id"), field("token-secret")),
                    ttl,
                    if expires.is_empty() { "<never>".to_string() } else { expires },
                    usages.join(","),
                    field("description")
                );
            }
        }
        TokenCommand::Delete { tokens: given, .. } => {
            for token in given {
                let id = token.split('.').next().unwrap_or_default();
                let name = format!("{}{id}", tokens::SECRET_PREFIX);
                match secrets.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => println!("bootstrap token {id:?} deleted"),
                    Err(kube::Error::Api(status)) if status.code == 404 => {
                        anyhow::bail!("bootstrap token {id:?} not found")
                    }
                    Err(error) => return Err(error.into()),
                }
            }
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
enum ImagesCommand {
    /// Import OCI image layouts or `docker save` archives (tar, or tar.gz) into the node's
    /// image store, pinned against image garbage collection.
    Import {
        /// The archives.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The node agent's data directory.
        #[arg(long, default_value = "/var/lib/tugboat/agent", env = "TUGBOAT_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// List the images in the node's image store.
    List {
        /// The node agent's data directory.
        #[arg(long, default_value = "/var/lib/tugboat/agent", env = "TUGBOAT_DATA_DIR")]
        data_dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct KubeletArgs {
    #[command(flatten)]
    component: ComponentArgs,
    #[command(flatten)]
    node: NodeFlags,
    /// Where the node agent keeps its state.
    #[arg(long, default_value = "/var/lib/tugboat/agent", env = "TUGBOAT_DATA_DIR")]
    data_dir: PathBuf,
}

#[derive(Debug, clap::Args)]
struct ProxyArgs {
    #[command(flatten)]
    component: ComponentArgs,
    /// The node's name (default: the host name): its endpoints are the local ones.
    #[arg(long)]
    node_name: Option<String>,
    #[command(flatten)]
    proxy: ProxyFlags,
    /// Remove the proxy's rules (both modes) and exit.
    #[arg(long)]
    cleanup: bool,
}

/// The service proxy's flags (`proxy`, and `server` and `agent`, which run it).
#[derive(Debug, Clone, clap::Args)]
struct ProxyFlags {
    /// Where the service proxy serves /metrics (rule programming latency); empty: not served.
    #[arg(long, default_value = "127.0.0.1:10249", value_parser = parse_optional_address)]
    proxy_metrics_address: OptionalAddress,
    /// How Services are programmed: nftables (one table of verdict maps) or iptables.
    #[arg(long, default_value = "nftables")]
    proxy_mode: tugboat_network::proxy::ProxyMode,
}

impl ProxyFlags {
    fn config(&self, node_name: String) -> tugboat_network::proxy::ProxyConfig {
        tugboat_network::proxy::ProxyConfig {
            node_name,
            metrics_address: self.proxy_metrics_address.0,
            mode: self.proxy_mode,
        }
    }
}

/// An address to serve on, or none (given empty).
#[derive(Debug, Clone, Copy)]
struct OptionalAddress(Option<std::net::SocketAddr>);

fn parse_optional_address(text: &str) -> Result<OptionalAddress, String> {
    if text.is_empty() {
        return Ok(OptionalAddress(None));
    }
    text.parse()
        .map(|a| OptionalAddress(Some(a)))
        .map_err(|_| format!("{text:?} is not an address such as 127.0.0.1:10249"))
}

/// The node agent's flags (accepted by `kubelet`, `agent` and `server`).
#[derive(Debug, Clone, clap::Args)]
struct NodeFlags {
    /// The node's name (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// The node's address (default: the address of the default route's interface).
    #[arg(long)]
    node_ip: Option<std::net::IpAddr>,
    /// Where containers' logs go, as `<namespace>_<pod>_<uid>/<container>/<restart>.log`.
    #[arg(long, default_value = "/var/log/pods")]
    pod_log_dir: PathBuf,
    /// The port of the kubelet's HTTPS API (logs, exec, attach, port-forward, stats).
    #[arg(long, default_value_t = 10250)]
    kubelet_port: u16,
    /// A registry (HOST:PORT) to pull images from over plain HTTP (repeatable).
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure_registries: Vec<String>,
    /// Static pod manifests: each file is a Pod run on this node (default: <data-dir>/manifests).
    #[arg(long)]
    pod_manifest_path: Option<PathBuf>,
    /// A container's log is rotated once it reaches this size (a quantity: 10Mi; 0: never).
    #[arg(long, default_value = "10Mi", value_parser = parse_bytes)]
    container_log_max_size: u64,
    /// How many log files (the current one and rotated ones) a container keeps.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(2..))]
    container_log_max_files: u32,
    /// Image garbage collection starts when the image filesystem is this full (percent;
    /// 100 turns it off)...
    #[arg(long, default_value_t = 85, value_parser = clap::value_parser!(u8).range(0..=100))]
    image_gc_high_threshold: u8,
    /// ...and removes unused images until it is down to this (percent).
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u8).range(0..=100))]
    image_gc_low_threshold: u8,
    /// Images used (or first seen) more recently than this are never collected (a duration:
    /// 2m, 30s).
    #[arg(long, default_value = "2m", value_parser = parse_duration_or_zero)]
    image_minimum_gc_age: Duration,
    /// `server` and `agent`: do not run the service proxy with the kubelet (`tugboat kubelet`
    /// never does; `tugboat proxy` runs it alone).
    #[arg(long)]
    disable_kube_proxy: bool,
    #[command(flatten)]
    proxy: ProxyFlags,
    /// The cluster DNS server's address, written into pods' resolv.conf.
    #[arg(long, default_value = "10.96.0.10")]
    cluster_dns: std::net::IpAddr,
    /// The cluster's DNS domain.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
}

/// A byte quantity as Kubernetes writes them: `10Mi`, `1G`, `512`.
fn parse_bytes(text: &str) -> Result<u64, String> {
    tugboat_kubelet::pods::quantity(text)
        .filter(|q| *q >= 0.0)
        .map(|q| q as u64)
        .ok_or_else(|| format!("{text:?} is not a size (e.g. 10Mi)"))
}

impl NodeFlags {
    fn kubelet_config(
        &self,
        data_dir: &std::path::Path,
        kubeconfig: &std::path::Path,
    ) -> tugboat_kubelet::KubeletConfig {
        tugboat_kubelet::KubeletConfig {
            node_name: self.node_name.clone(),
            node_ip: self.node_ip,
            data_dir: data_dir.to_path_buf(),
            log_dir: self.pod_log_dir.clone(),
            port: self.kubelet_port,
            client_ca: root_ca(kubeconfig),
            insecure_registries: self.insecure_registries.clone(),
            manifest_dir: self.pod_manifest_path.clone(),
            log_max_size: self.container_log_max_size,
            log_max_files: self.container_log_max_files,
            image_gc: tugboat_kubelet::image_gc::Policy {
                high: self.image_gc_high_threshold,
                low: self.image_gc_low_threshold.min(self.image_gc_high_threshold),
                min_age: self.image_minimum_gc_age,
            },
            kubeconfig: Some(kubeconfig.to_path_buf()),
            // The kubelet names the node.
            proxy: (!self.disable_kube_proxy).then(|| self.proxy.config(String::new())),
            dns: tugboat_kubelet::pods::ClusterDns {
                server: self.cluster_dns,
                domain: self.cluster_domain.trim_matches('.').to_string(),
            },
        }
    }
}

#[derive(Debug, clap::Args)]
struct SchedulerArgs {
    #[command(flatten)]
    component: ComponentArgs,
    #[command(flatten)]
    election: ElectionFlags,
}

/// Leader election of the components of which one instance acts at a time.
#[derive(Debug, Clone, clap::Args)]
struct ElectionFlags {
    /// Act only while holding the component's Lease in kube-system, so that several servers
    /// (or several instances) can run it: one acts, the others wait to take over.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
}

#[derive(Debug, clap::Args)]
struct ControllerManagerArgs {
    #[command(flatten)]
    component: ComponentArgs,
    #[command(flatten)]
    election: ElectionFlags,
    #[command(flatten)]
    controllers: ControllerFlags,
    /// The CA certificate that signs approved certificate requests (with the key below;
    /// `tugboat server` uses <data-dir>/pki/ca.crt).
    #[arg(long, requires = "cluster_signing_key_file")]
    cluster_signing_cert_file: Option<PathBuf>,
    #[arg(long, requires = "cluster_signing_cert_file")]
    cluster_signing_key_file: Option<PathBuf>,
}

/// The controller manager's flags (accepted by `server` too).
#[derive(Debug, Clone, clap::Args)]
struct ControllerFlags {
    /// A node whose heartbeat is older than this becomes Ready=Unknown and unreachable.
    #[arg(long, default_value = "40s", value_parser = parse_duration)]
    node_monitor_grace_period: Duration,
    /// Nodes' pod CIDRs are carved out of this range.
    #[arg(long, default_value = "10.244.0.0/16")]
    cluster_cidr: tugboat_controllers::nodeipam::Cidr,
    /// The prefix length of each node's pod CIDR.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u8).range(8..=30))]
    node_cidr_mask_size: u8,
    /// The longest validity of certificates signed for requests (nodes' client and serving
    /// certificates renew themselves well before).
    #[arg(long, default_value = "8760h", value_parser = parse_duration)]
    cluster_signing_duration: Duration,
}

impl ControllerFlags {
    fn config(&self) -> tugboat_controllers::ControllerConfig {
        tugboat_controllers::ControllerConfig {
            node_monitor_grace_period: self.node_monitor_grace_period,
            cluster_cidr: self.cluster_cidr,
            node_cidr_mask_size: self.node_cidr_mask_size,
            root_ca: None,
            signing_ca: None,
            signing_duration: self.cluster_signing_duration,
            connect: None,
            informers: None,
        }
    }
}

/// Opens clients from `kubeconfig` on connections of their own, over HTTP/2 (see
/// [`tugboat_controllers::ControllerConfig::connect`]).
fn connect_http2(kubeconfig: &std::path::Path) -> tugboat_controllers::Connect {
    let kubeconfig = kubeconfig.to_path_buf();
    tugboat_controllers::Connect(std::sync::Arc::new(move || {
        let kubeconfig = kubeconfig.clone();
        Box::pin(async move { client_with(&kubeconfig, None, true).await })
    }))
}

#[derive(Debug, clap::Args)]
struct HollowArgs {
    #[command(flatten)]
    component: ComponentArgs,
    /// How many nodes.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Nodes are named `<prefix>-0`, `<prefix>-1`, ...
    #[arg(long, default_value = "hollow")]
    name_prefix: String,
    /// Each node's CPU capacity.
    #[arg(long, default_value = "4")]
    cpu: String,
    /// Each node's memory capacity.
    #[arg(long, default_value = "16Gi")]
    memory: String,
    /// Pods per node.
    #[arg(long, default_value_t = 110)]
    max_pods: u32,
    /// How often each node renews its Lease in kube-node-lease.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    lease_renew_interval: Duration,
    /// How long pods that are not restarted (Jobs' pods) run before they exit; 0 runs them
    /// forever. The exit code comes from the pod's `hollow.tugboat.dev/exit-code` annotation.
    #[arg(long, default_value = "1s", value_parser = parse_duration_or_zero)]
    pod_exit_after: Duration,
    /// How long a deleted pod takes to stop (at most its grace period), as real containers
    /// take to exit on SIGTERM.
    #[arg(long, default_value = "200ms", value_parser = parse_duration_or_zero)]
    pod_stop_time: Duration,
}

/// A component that talks to an API server.
#[derive(Debug, clap::Args)]
struct ComponentArgs {
    /// The kubeconfig with the API server's address and credentials.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
}

#[derive(Debug, clap::Args)]
struct ServerArgs {
    /// Where the server keeps its state (the embedded store lives in <data-dir>/db).
    #[arg(long, default_value = "/var/lib/tugboat", env = "TUGBOAT_DATA_DIR")]
    data_dir: PathBuf,
    /// Keep the cluster's state in etcd instead: comma-separated http(s)://host:2379 URLs.
    #[arg(long)]
    datastore_endpoint: Option<String>,
    /// Compact the store this often (to the revision seen one interval earlier): 300s, 5m, 1h.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    compaction_interval: Duration,
    /// The address to serve the Kubernetes API on.
    #[arg(long, default_value = "0.0.0.0")]
    bind_address: std::net::IpAddr,
    /// The address the rest of the cluster reaches this server at: the endpoint of the
    /// `kubernetes` Service (default: the bind address, or the default route's interface
    /// address when bound to all).
    #[arg(long)]
    advertise_address: Option<std::net::IpAddr>,
    /// The HTTPS port of the Kubernetes API.
    #[arg(long, default_value_t = 6443)]
    https_port: u16,
    /// Serve the etcd v3 API (mutual TLS, certificates in <data-dir>/pki/etcd) over the
    /// embedded store at this address, for etcdctl; "" for none. Not with --datastore-endpoint
    /// (etcd itself serves it).
    #[arg(long, default_value = "127.0.0.1:2379")]
    etcd_api_listen: String,
    /// Static bearer tokens, one `token,user,uid,"group1,group2"` per line.
    #[arg(long)]
    token_auth_file: Option<PathBuf>,
    /// The range Services' ClusterIPs are allocated from.
    #[arg(long, default_value = "10.96.0.0/16")]
    service_cidr: tugboat_apiserver::ServiceCidr,
    /// `server` only: do not run the scheduler in this process.
    #[arg(long)]
    disable_scheduler: bool,
    /// `server` only: do not run the controller manager in this process.
    #[arg(long)]
    disable_controller_manager: bool,
    /// `server` only: do not run the node agent (kubelet) in this process.
    #[arg(long)]
    disable_agent: bool,
    #[command(flatten)]
    election: ElectionFlags,
    #[command(flatten)]
    node: NodeFlags,
    #[command(flatten)]
    controllers: ControllerFlags,
    /// How long the join token made at first start (`<data-dir>/token`) is valid: 24h, 90m;
    /// 0 for ever. A restart makes a new one once it has expired.
    #[arg(long, default_value = "24h", value_parser = parse_duration_or_zero)]
    token_ttl: Duration,
    /// Save a snapshot of the store this often (0: never), into --snapshot-dir.
    #[arg(long, default_value = "12h", value_parser = parse_duration_or_zero)]
    snapshot_interval: Duration,
    /// How many scheduled snapshots to keep (the oldest go first).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    snapshot_retention: u32,
    /// Where scheduled snapshots go (default: <data-dir>/snapshots).
    #[arg(long)]
    snapshot_dir: Option<PathBuf>,
    /// Seconds a new pod tolerates its node being unreachable before it is evicted.
    #[arg(long, default_value_t = 300)]
    default_unreachable_toleration_seconds: i64,
    /// Seconds a new pod tolerates its node being not ready before it is evicted.
    #[arg(long, default_value_t = 300)]
    default_not_ready_toleration_seconds: i64,
}

/// Parses `300`, `300s`, `5m`, `1h`, `250ms`.
/// A duration where zero means "never".
fn images(command: &ImagesCommand) -> ExitCode {
    let result = (|| -> anyhow::Result<()> {
        match command {
            ImagesCommand::Import { files, data_dir } => {
                let store = tugboat_runtime::images::ImageStore::open(data_dir.join("content"))?;
                for file in files {
                    let names = store.import(file).with_context(|| format!("importing {}", file.display()))?;
                    for name in names {
                        println!("imported {name}");
                    }
                }
            }
            ImagesCommand::List { data_dir } => {
                let store = tugboat_runtime::images::ImageStore::open(data_dir.join("content"))?;
                println!("{:<50} {:<20} PINNED", "IMAGE", "ID");
                for (name, image) in store.list() {
                    let id = image.manifest.trim_start_matches("sha256:");
                    println!("{name:<50} {:<20} {}", &id[..id.len().min(12)], image.pinned);
                }
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_duration_or_zero(text: &str) -> Result<Duration, String> {
    if text.trim().trim_end_matches(|c: char| c.is_ascii_alphabetic()).chars().all(|c| c == '0')
        && !text.trim().is_empty()
    {
        return Ok(Duration::ZERO);
    }
    parse_duration(text)
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration such as 30s, 5m or 1h"))?;
    let duration = match unit {
        "" | "s" => Duration::from_secs(number),
        "ms" => Duration::from_millis(number),
        "m" => Duration::from_secs(number * 60),
        "h" => Duration::from_secs(number * 3600),
        _ => {
            return Err(format!("{text:?}: unknown unit {unit:?} (use ms, s, m or h)"));
        }
    };
    if duration.is_zero() {
        return Err("the duration must be positive".into());
    }
    Ok(duration)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The shim forks the container: it runs before any thread exists.
    match &cli.command {
        Command::Shim { dir } => return ExitCode::from(tugboat_runtime::shim::main(dir) as u8),
        Command::ExecIn { dir, command } => {
            return ExitCode::from(tugboat_runtime::exec::main(dir, command.clone()) as u8);
        }
        Command::Images(command) => return images(command),
        Command::Install(_) | Command::Uninstall(_) => {
            let result = match cli.command {
                Command::Install(args) => install::install(args),
                Command::Uninstall(args) => install::uninstall(args),
                _ => unreachable!("matched above"),
            };
            return match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("error: {error:#}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    // One TLS crypto provider for every crate that uses rustls.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| DEFAULT_LOG_FILTER.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR")))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            // Handled before the async runtime starts.
            Command::Shim { .. }
            | Command::ExecIn { .. }
            | Command::Images(_)
            | Command::Install(_)
            | Command::Uninstall(_) => Ok(()),
            Command::Token(command) => token(command).await,
            Command::Snapshot(command) => snapshot::run(command).await,
            Command::Server(args) => server(args, true).await,
            Command::Apiserver(args) => server(args, false).await,
            Command::Agent(args) => {
                tokio::select! {
                    result = agent::run(args) => result,
                    result = wait_for_shutdown() => result,
                }
            }
            Command::Kubelet(args) => {
                let client = client(&args.component.kubeconfig).await?;
                let mut config = args.node.kubelet_config(&args.data_dir, &args.component.kubeconfig);
                // Upstream's kubelet has no proxy in it: `tugboat proxy` is that.
                config.proxy = None;
                tokio::select! {
                    result = tugboat_kubelet::run(client, config) => result,
                    result = wait_for_shutdown() => result,
                }
            }
            Command::Proxy(args) if args.cleanup => tugboat_network::proxy::cleanup(),
            Command::Proxy(args) => {
                let client = client(&args.component.kubeconfig).await?;
                let config = args.proxy.config(args.node_name.unwrap_or_else(tugboat_kubelet::host::hostname));
                tokio::select! {
                    () = tugboat_network::proxy::run(client, config) => Ok(()),
                    result = wait_for_shutdown() => result,
                }
            }
            Command::HollowNodes(args) => {
                let client = client(&args.component.kubeconfig).await?;
                let config = tugboat_hollow::HollowConfig {
                    count: args.count,
                    name_prefix: args.name_prefix,
                    cpu: args.cpu,
                    memory: args.memory,
                    max_pods: args.max_pods,
                    lease_renew: args.lease_renew_interval,
                    pod_exit_after: Some(args.pod_exit_after).filter(|d| !d.is_zero()),
                    pod_stop_time: args.pod_stop_time,
                    ..tugboat_hollow::HollowConfig::default()
                };
                tokio::select! {
                    result = tugboat_hollow::run(client, config) => result,
                    result = wait_for_shutdown() => result,
                }
            }
            Command::ControllerManager(args) => {
                let client = client(&args.component.kubeconfig).await?;
                let mut config = args.controllers.config();
                config.root_ca = root_ca(&args.component.kubeconfig);
                config.connect = Some(connect_http2(&args.component.kubeconfig));
                if let (Some(cert), Some(key)) = (&args.cluster_signing_cert_file, &args.cluster_signing_key_file) {
                    config.signing_ca = Some(std::sync::Arc::new(tugboat_pki::ClusterCa::from_files(cert, key)?));
                }
                let run = elected(
                    args.election.leader_elect.then(|| client.clone()),
                    None,
                    "kube-controller-manager",
                    move || {
                        let (client, config) = (client.clone(), config.clone());
                        async move { tugboat_controllers::run(client, config).await }
                    },
                );
                tokio::select! {
                    result = run => result,
                    result = wait_for_shutdown() => result,
                }
            }
            Command::Scheduler(args) => {
                let client = client(&args.component.kubeconfig).await?;
                let run =
                    elected(args.election.leader_elect.then(|| client.clone()), None, "kube-scheduler", move || {
                        tugboat_scheduler::run(client.clone())
                    });
                tokio::select! {
                    result = run => result,
                    result = wait_for_shutdown() => result,
                }
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// A Kubernetes client from a kubeconfig file.
async fn client(kubeconfig: &std::path::Path) -> anyhow::Result<kube::Client> {
    client_via(kubeconfig, None).await
}

/// A client from a kubeconfig file, talking to `server` instead of the file's when given.
async fn client_via(kubeconfig: &std::path::Path, server: Option<&str>) -> anyhow::Result<kube::Client> {
    client_with(kubeconfig, server, false).await
}

/// [`client_via`], over HTTP/2 when `http2` (one connection, its requests as streams) and
/// HTTP/1.1 otherwise (a connection per request in flight: a watch holds one).
async fn client_with(kubeconfig: &std::path::Path, server: Option<&str>, http2: bool) -> anyhow::Result<kube::Client> {
    let file = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading the kubeconfig {}", kubeconfig.display()))?;
    let mut config = kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
        .await
        .with_context(|| format!("using the kubeconfig {}", kubeconfig.display()))?;
    if let Some(server) = server {
        config.cluster_url = server.parse().with_context(|| format!("{server:?} is not a URL"))?;
    }
    // kube's own stack, less tracing and retries, over connections with TCP_NODELAY: without
    // it a request whose body leaves in a second TLS record waits for the server's delayed
    // ACK, 40 ms a write (kube does not set it; Go's clients do).
    use kube::client::ConfigExt;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    // kube's stack gives up connecting after its connect timeout; keepalive probes find a peer
    // that vanished (a cut link) under a long watch.
    http.set_connect_timeout(config.connect_timeout);
    http.set_keepalive(Some(Duration::from_secs(30)));
    // A client certificate is read from the kubeconfig again when the file changes (a node's
    // renewed certificate, written by its kubelet), for every new connection.
    let tls = match (tugboat_kubelet::certificates::KubeconfigIdentity::new(kubeconfig), &config.root_cert) {
        (Some(identity), Some(roots)) => {
            let mut store = rustls::RootCertStore::empty();
            for der in roots {
                store.add(rustls::pki_types::CertificateDer::from(der.clone()))?;
            }
            let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
            Some(
                rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(store)
                    .with_client_cert_resolver(identity),
            )
        }
        _ => None,
    };
    let https = match (tls, http2) {
        (Some(tls), false) => hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http),
        (None, false) => config.rustls_https_connector_with_connector(http)?,
        (tls, true) => {
            let tls = match tls {
                Some(tls) => tls,
                None => config.rustls_client_config()?,
            };
            let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
            let builder = match &config.tls_server_name {
                Some(name) => builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(
                    name.clone().try_into().with_context(|| format!("{name:?} is not a server name"))?,
                )),
                None => builder,
            };
            builder.enable_http2().wrap_connector(http)
        }
    };
    let hyper_client: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(http2)
            .build(https);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .service(hyper_client);
    Ok(kube::Client::new(service, config.default_namespace))
}

/// The cluster CA (PEM) a kubeconfig trusts, for the `kube-root-ca.crt` ConfigMaps.
fn root_ca(kubeconfig: &std::path::Path) -> Option<String> {
    use base64::Engine;
    let file = kube::config::Kubeconfig::read_from(kubeconfig).ok()?;
    let cluster = file.clusters.first()?.cluster.as_ref()?;
    match (&cluster.certificate_authority_data, &cluster.certificate_authority) {
        (Some(data), _) => String::from_utf8(base64::engine::general_purpose::STANDARD.decode(data.trim()).ok()?).ok(),
        (None, Some(path)) => std::fs::read_to_string(path).ok(),
        _ => None,
    }
}

/// Runs a component in the background of `server`, restarting it if it fails.
fn spawn_component<F, Fut>(name: &'static str, start: F) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    tokio::spawn(keep_running(name, start))
}

/// Runs `start()` again a second after each time it ends, logging why: a new reason at WARN,
/// the same reason again only at DEBUG (with a reminder at WARN every 5 minutes), so a
/// component that cannot start says so once rather than every second.
async fn keep_running<F, Fut>(name: &'static str, start: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut repeats = Repeats::default();
    loop {
        let reason = match start().await {
            Ok(()) => "stopped".to_string(),
            Err(error) => format!("{error:#}"),
        };
        match repeats.seen(&reason, std::time::Instant::now()) {
            None => tracing::debug!(component = name, error = %reason, "failed again; restarting"),
            Some(0) => tracing::warn!(component = name, error = %reason, "failed; restarting"),
            Some(times) => {
                tracing::warn!(component = name, error = %reason, times, "still failing; restarting every second")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Which failures of a restarted component to log at WARN: the first of each reason, and a
/// reminder (with how often it failed since) every [`Repeats::REMIND`].
#[derive(Debug, Default)]
struct Repeats {
    last: Option<(String, std::time::Instant)>,
    since: u64,
}

impl Repeats {
    const REMIND: Duration = Duration::from_secs(300);

    /// `None`: say it quietly; `Some(n)`: say it aloud, having been quiet about it `n` times.
    fn seen(&mut self, reason: &str, now: std::time::Instant) -> Option<u64> {
        match &self.last {
            Some((said, at)) if said == reason && now.duration_since(*at) < Self::REMIND => {
                self.since += 1;
                None
            }
            Some((said, _)) if said == reason => {
                self.last = Some((reason.to_string(), now));
                Some(std::mem::take(&mut self.since))
            }
            _ => {
                self.last = Some((reason.to_string(), now));
                self.since = 0;
                Some(0)
            }
        }
    }
}

/// Says once, plainly, what keeps this host's components from working: a loopback that is
/// down (they reach the API server at 127.0.0.1) or no address but loopback (nothing to
/// advertise, no node address). `api` is the API server's port on loopback when it listens
/// there; `address` the address found or given.
fn network_preflight(api: Option<u16>, address: Option<std::net::IpAddr>, flags: &str) {
    if let Some(port) = api
        && let Err(error) =
            std::net::TcpStream::connect_timeout(&(std::net::Ipv4Addr::LOCALHOST, port).into(), Duration::from_secs(1))
    {
        tracing::error!(
            error = %error,
            "no usable loopback: the components reach the API server at 127.0.0.1:{port}, which fails; \
             bring loopback up (`ip link set lo up`); retrying quietly meanwhile"
        );
    }
    if address.is_none() {
        tracing::error!(
            "no usable address: no interface but loopback has an IPv4 address and no default route leads \
             anywhere; give {flags}, or configure the network; retrying quietly meanwhile"
        );
    }
}

/// Runs a single-instance component: under leader election for `lease` when given an
/// election client, else (`--leader-elect=false`) at once; restarted whenever it fails.
fn elected<F, Fut>(
    election: Option<kube::Client>,
    data_dir: Option<&std::path::Path>,
    lease: &'static str,
    start: F,
) -> impl Future<Output = anyhow::Result<()>> + use<F, Fut>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let identity = leader::identity(data_dir);
    async move {
        match election {
            Some(client) => leader::Election::new(client, lease, &identity).run(lease, start).await,
            None => {
                keep_running(lease, start).await;
                Ok(())
            }
        }
    }
}

/// What is logged unless RUST_LOG says otherwise: INFO, but not kube's WARN at every handshake
/// of the one client that skips certificate checks — `tugboat agent`'s discovery of
/// cluster-info before it knows the CA, which it says once itself.
const DEFAULT_LOG_FILTER: &str = "info,kube_client::client::tls=error";

/// Whether log lines get ANSI colours: only on a terminal, and not when `NO_COLOR` is set to
/// anything but the empty string (<https://no-color.org>).
fn colour(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

async fn server(args: ServerArgs, full: bool) -> anyhow::Result<()> {
    // Before the ready line: a SIGTERM sent as soon as a user (or a test) sees it must find the
    // handler installed, not the default action that kills the process.
    let shutdown = shutdown_signal()?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating the data dir {}", args.data_dir.display()))?;
    let config = DatastoreConfig::from_flags(&args.data_dir, args.datastore_endpoint.as_deref())?;
    let store = open_datastore(config.clone()).await?;
    let revision = store.current_revision().await?;
    let policy = CompactionPolicy { interval: args.compaction_interval, ..CompactionPolicy::default() };
    let compactor = spawn_compactor(&store, policy);
    let backend = match &config {
        DatastoreConfig::Sqlite(sqlite) => format!("sqlite {}", sqlite.path.display()),
        DatastoreConfig::Etcd(etcd) => format!("etcd {}", etcd.endpoints.join(",")),
    };
    let api_config = ApiServerConfig {
        data_dir: args.data_dir.clone(),
        bind_address: args.bind_address,
        https_port: args.https_port,
        token_auth_file: args.token_auth_file.clone(),
        service_cidr: args.service_cidr,
        default_not_ready_toleration_seconds: args.default_not_ready_toleration_seconds,
        default_unreachable_toleration_seconds: args.default_unreachable_toleration_seconds,
        // Bound to every address: advertise the default route's interface address, as upstream.
        advertise_address: args
            .advertise_address
            .or_else(|| args.bind_address.is_unspecified().then(tugboat_kubelet::host::node_ip).flatten()),
        join_token_ttl: args.token_ttl.as_secs(),
    };
    let api = tugboat_apiserver::start(api_config, store.clone()).await?;
    if full {
        let loopback =
            (args.bind_address.is_unspecified() || args.bind_address.is_loopback()).then(|| api.local_addr().port());
        let address = api.advertise_address().or(args.node.node_ip);
        network_preflight(loopback, address, "--advertise-address (and --node-ip)");
    }
    // etcd's API over the embedded store, for etcdctl (a real etcd serves its own).
    let etcd_api = match (&config, args.etcd_api_listen.trim()) {
        (DatastoreConfig::Sqlite(sqlite), listen) if !listen.is_empty() => {
            let listen: std::net::SocketAddr =
                listen.parse().with_context(|| format!("--etcd-api-listen {listen:?}: not an IP:port"))?;
            let wal = sqlite.path.with_extension("db-wal");
            let pki = args.data_dir.join("pki").join("etcd");
            let name = tugboat_kubelet::host::hostname();
            let files = vec![sqlite.path.clone(), wal];
            let leases = sqlite.path.with_file_name("etcd-leases.json");
            let (address, task) = tugboat_etcdapi::start(listen, &pki, &name, store.clone(), files, Some(leases)).await?;
            tracing::info!(%address, certificates = %args.data_dir.join("pki/etcd").display(), "etcd API serving");
            Some(task)
        }
        _ => None,
    };
    let (join_server, join_token) = api.join();
    println!(
        "To join a node to this cluster, run on it:\n\n  tugboat agent --server {join_server} --token {join_token}\n"
    );
    tracing::info!(
        store = %backend,
        revision,
        address = %api.local_addr(),
        kubeconfig = %api.admin_kubeconfig().display(),
        "tugboat server ready"
    );

    if full && !args.snapshot_interval.is_zero() {
        snapshot::schedule(
            store.clone(),
            args.snapshot_dir.clone().unwrap_or_else(|| args.data_dir.join("snapshots")),
            args.snapshot_interval,
            args.snapshot_retention as usize,
            matches!(config, DatastoreConfig::Etcd(_)),
        );
    }

    let mut components = Vec::new();
    // One client for the elections of this server's components (in-process, as admin).
    let election = match args.election.leader_elect {
        true => Some(client(api.admin_kubeconfig()).await?),
        false => None,
    };
    // The scheduler and the controller manager read pods, nodes, claims, volumes and budgets
    // from the same informers: one watch and one decoded copy of each object.
    let informers = std::sync::Arc::new(tugboat_objects::informer::Informers::new(client(api.admin_kubeconfig()).await?));
    if full && !args.disable_scheduler {
        let kubeconfig = api.admin_kubeconfig().to_path_buf();
        let informers = informers.clone();
        let run = elected(election.clone(), Some(&args.data_dir), "kube-scheduler", move || {
            let (kubeconfig, informers) = (kubeconfig.clone(), informers.clone());
            async move { tugboat_scheduler::run_with(client(&kubeconfig).await?, informers).await }
        });
        components.push(tokio::spawn(async move {
            let _ = run.await;
        }));
    }

    if full && !args.disable_controller_manager {
        let kubeconfig = api.admin_kubeconfig().to_path_buf();
        let mut config = args.controllers.config();
        config.root_ca = root_ca(&kubeconfig);
        config.connect = Some(connect_http2(&kubeconfig));
        config.informers = Some(informers.clone());
        // In-process, the controller manager signs with the cluster CA itself.
        config.signing_ca =
            Some(std::sync::Arc::new(tugboat_pki::ClusterCa::load_or_create(&args.data_dir.join("pki"))?));
        let run = elected(election.clone(), Some(&args.data_dir), "kube-controller-manager", move || {
            let (kubeconfig, config) = (kubeconfig.clone(), config.clone());
            async move { tugboat_controllers::run(client(&kubeconfig).await?, config).await }
        });
        components.push(tokio::spawn(async move {
            let _ = run.await;
        }));
    }

    if full {
        // Cluster DNS, at this server's address; `kube-dns` names every live one.
        let address = api.advertise_address().unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
        let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let config = tugboat_dns::DnsConfig {
            address,
            port: 53,
            cluster_ip: args.node.cluster_dns,
            domain: args.node.cluster_domain.clone(),
            upstreams: tugboat_dns::serve::host_resolvers(&resolv, &[args.node.cluster_dns, address]),
        };
        let kubeconfig = api.admin_kubeconfig().to_path_buf();
        components.push(spawn_component("cluster DNS", move || {
            let (kubeconfig, config) = (kubeconfig.clone(), config.clone());
            async move {
                tugboat_dns::run(client(&kubeconfig).await?, config).await;
                Ok(())
            }
        }));
    }

    if full && !args.disable_agent {
        let kubeconfig = api.admin_kubeconfig().to_path_buf();
        let config = args.node.kubelet_config(&args.data_dir, &kubeconfig);
        components.push(spawn_component("kubelet", move || {
            let (kubeconfig, config) = (kubeconfig.clone(), config.clone());
            async move { tugboat_kubelet::run(client(&kubeconfig).await?, config).await }
        }));
    }

    shutdown.await;
    tracing::info!("shutting down");
    components.iter().for_each(|c| c.abort());
    api.stop();
    drop(api);
    compactor.abort();
    if let Some(task) = etcd_api {
        task.abort();
    }
    drop(store);
    Ok(())
}

async fn wait_for_shutdown() -> anyhow::Result<()> {
    shutdown_signal()?.await;
    Ok(())
}

/// Installs the SIGTERM and SIGINT handlers now; the future ends at the first of them.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_colours_only_on_terminals_without_no_color() {
        assert!(colour(true, None));
        assert!(!colour(false, None));
        assert!(!colour(true, Some("1".into())));
        // NO_COLOR set but empty does not count (no-color.org).
        assert!(colour(true, Some("".into())));
    }

    #[test]
    fn a_failing_component_says_each_reason_once_then_reminds() {
        let start = std::time::Instant::now();
        let mut repeats = Repeats::default();
        assert_eq!(repeats.seen("unreachable", start), Some(0));
        for second in 1..10 {
            assert_eq!(repeats.seen("unreachable", start + Duration::from_secs(second)), None);
        }
        assert_eq!(repeats.seen("refused", start + Duration::from_secs(10)), Some(0));
        assert_eq!(repeats.seen("refused", start + Duration::from_secs(11)), None);
        assert_eq!(repeats.seen("refused", start + Duration::from_secs(10) + Repeats::REMIND), Some(1));
        assert_eq!(repeats.seen("refused", start + Duration::from_secs(11) + Repeats::REMIND), None);
    }

    #[test]
    fn durations_parse_like_the_flags_document() {
        assert_eq!(parse_duration("300"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("m").is_err());
    }
}
