//! `tugboat agent`: joins this host to a cluster as a node — verifying the cluster's CA by the
//! token's signature of cluster-info (or a CA hash), getting a node client certificate through
//! the CSR API — then runs its kubelet. Every API connection of the node goes through a
//! loopback forwarder over the `--server`s given ([`crate::balancer`]), so the node fails
//! over between servers.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::{NodeFlags, parse_duration};

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// The API server to join: https://HOST:6443; several (repeated, or comma-separated) to
    /// fail over between.
    #[arg(long, env = "TUGBOAT_SERVER", required = true, value_delimiter = ',')]
    server: Vec<String>,
    /// A bootstrap token (`tugboat token create`; the server's <data-dir>/token).
    #[arg(long, env = "TUGBOAT_TOKEN")]
    token: String,
    /// Trust only a cluster CA whose public key hashes to this (sha256:<hex>, as kubeadm's
    /// --discovery-token-ca-cert-hash); the token's signature of cluster-info is checked anyway.
    #[arg(long)]
    ca_cert_hash: Option<String>,
    /// How long to keep asking for a cluster-info signed by the token (a server just started
    /// signs within seconds): 30s, 5m.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    discovery_timeout: Duration,
    #[command(flatten)]
    node: NodeFlags,
    /// Where the agent keeps its state (its credentials: <data-dir>/kubelet.kubeconfig).
    #[arg(long, default_value = "/var/lib/tugboat/agent", env = "TUGBOAT_DATA_DIR")]
    data_dir: PathBuf,
}

/// Joins (once) and runs the node agent.
pub async fn run(mut args: AgentArgs) -> anyhow::Result<()> {
    // Named once: the certificate and the kubelet name the same node.
    args.node.node_name.get_or_insert_with(tugboat_kubelet::host::hostname);
    crate::network_preflight(None, args.node.node_ip.or_else(tugboat_kubelet::host::node_ip), "--node-ip");
    let local = crate::balancer::start(&args.server).await?;
    let kubeconfig = join(&args, &local).await?;
    let client = crate::client_via(&kubeconfig, Some(&local)).await?;
    let config = args.node.kubelet_config(&args.data_dir, &kubeconfig);
    tugboat_kubelet::run(client, config).await
}

/// Joins the cluster (once: the credentials are kept) and returns the node's kubeconfig.
async fn join(args: &AgentArgs, local: &str) -> anyhow::Result<PathBuf> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::Api;
    use tugboat_pki::bootstrap;
    let kubeconfig = args.data_dir.join("kubelet.kubeconfig");
    if kubeconfig.exists() {
        return Ok(kubeconfig);
    }
    std::fs::create_dir_all(&args.data_dir)?;
    let token = args.token.trim();
    let (id, _) = bootstrap::parse(token)
        .ok_or_else(|| anyhow::anyhow!("the token is not a bootstrap token ([a-z0-9]{{6}}.[a-z0-9]{{16}})"))?;
    // Errors name the servers given; connections go through the local forwarder.
    let named = args.server.join(",");
    let server = named.as_str();
    // cluster-info, over TLS that trusts nothing yet: its signature by the token is the proof.
    let mut insecure = kube::Config::new(local.parse().with_context(|| format!("{local:?} is not a URL"))?);
    insecure.accept_invalid_certs = true;
    let maps: Api<ConfigMap> = Api::namespaced(kube::Client::try_from(insecure)?, bootstrap::PUBLIC_NAMESPACE);
    let deadline = std::time::Instant::now() + args.discovery_timeout;
    tracing::info!(
        server,
        "reading cluster-info without verifying the server's certificate: the expected discovery before the \
         cluster CA is known (the token's signature of cluster-info is what proves it)"
    );
    // Asked again until the token's signature is there (or the time is up).
    let mut first_refusal = true;
    let published = loop {
        let mut token_problem = false;
        let answer = maps.get(bootstrap::CLUSTER_INFO).await.map_err(|e| match e {
            kube::Error::Api(status) => {
                anyhow::anyhow!("the server at {server} answered {}: {}", status.code, status.message)
            }
            other => anyhow::anyhow!("cannot reach the server at {server}: {other}"),
        });
        let error = match answer {
            Ok(info) => {
                let mut data = info.data.unwrap_or_default();
                let published = data.remove("kubeconfig");
                match (published, data.remove(&format!("{}{id}", bootstrap::JWS_PREFIX))) {
                    (Some(published), Some(jws)) if bootstrap::verify_jws(&published, &jws, token) => {
                        break published;
                    }
                    // Asked again: cluster-info may have just changed, before the signer signed it anew.
                    (Some(_), Some(_)) => {
                        token_problem = true;
                        anyhow::anyhow!(
                            "the token's secret does not match: cluster-info's signature for {id:?} fails, so its CA \
                         cannot be trusted"
                        )
                    }
                    (None, _) => anyhow::anyhow!("the cluster-info ConfigMap has no kubeconfig"),
                    (Some(_), None) => {
                        token_problem = true;
                        anyhow::anyhow!(
                            "the token is unknown or has expired: cluster-info carries no signature for token ID {id:?}"
                        )
                    }
                }
            }
            Err(error) => error,
        };
        if std::time::Instant::now() > deadline {
            return Err(error);
        }
        // Said once, with what to do; then asked again quietly until --discovery-timeout (a
        // server just started, or a token just made, is signed within seconds).
        if std::mem::take(&mut first_refusal) {
            let hint = if token_problem {
                "check the token: `tugboat token list` on the server shows the valid ones, \
                 `tugboat token create --print-join-command` makes a new one"
            } else {
                "check --server and that `tugboat server` runs there and is reachable from this host"
            };
            tracing::warn!(error = %error, timeout = ?args.discovery_timeout, "cannot join yet: {hint}; asking again");
        } else {
            tracing::debug!(error = %error, "cluster-info: asking again");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let published = kube::config::Kubeconfig::from_yaml(&published)?;
    let ca_b64 = published
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.certificate_authority_data.clone())
        .ok_or_else(|| anyhow::anyhow!("cluster-info names no CA"))?;
    use base64::Engine;
    let ca_pem = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(ca_b64.trim())?)?;
    if let Some(wanted) = &args.ca_cert_hash {
        let have =
            tugboat_pki::ca_cert_hash(&ca_pem).ok_or_else(|| anyhow::anyhow!("the cluster CA does not parse"))?;
        if have != *wanted {
            anyhow::bail!("the cluster CA's hash is {have}, not the --ca-cert-hash given ({wanted})");
        }
    }
    // A client certificate for the node, asked for with the token and signed by the cluster.
    let node_name = args.node.node_name.clone().expect("the agent names its node before joining");
    let bootstrap_config = tugboat_pki::token_kubeconfig(local, &ca_pem, token);
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::from_yaml(&bootstrap_config)?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    let bootstrap_client = kube::Client::try_from(config)?;
    refuse_a_live_namesake(&bootstrap_client, &node_name).await?;
    use tugboat_kubelet::certificates;
    let user = format!("system:node:{node_name}");
    let usages = ["digital signature", "client auth"];
    let timeout = Duration::from_secs(120);
    let asked = certificates::request(
        &bootstrap_client,
        certificates::KUBELET_CLIENT,
        "node-csr-",
        &user,
        &["system:nodes"],
        (&[], &[]),
        &usages,
        timeout,
    );
    let (certificate, key) = asked.await.map_err(|error| match error.downcast_ref::<kube::Error>() {
        Some(kube::Error::Api(status)) if status.code == 401 => {
            anyhow::anyhow!("the token is unknown or has expired: the server refused it")
        }
        _ => error.context("asking for a node certificate"),
    })?;
    // The kubeconfig names the first server (for people and other tools); the agent itself
    // always goes through its forwarder.
    let first = args.server[0].trim_end_matches('/');
    let contents = tugboat_pki::client_cert_kubeconfig(first, &ca_pem, &certificate, &key, &user);
    tugboat_pki::write_file(&kubeconfig, contents.as_bytes(), 0o600)?;
    tracing::info!(node = %node_name, kubeconfig = %kubeconfig.display(), "joined the cluster");
    Ok(kubeconfig)
}

/// Refuses to join as `name` while a Ready node of that name is in the cluster (another host
/// holds it); a NotReady one is taken over (this host, joining again after losing its data).
async fn refuse_a_live_namesake(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Node;
    let nodes: kube::Api<Node> = kube::Api::all(client.clone());
    let node = match nodes.get_opt(name).await {
        Ok(node) => node,
        // A server that does not let bootstrappers read nodes: nothing to check against.
        Err(kube::Error::Api(status)) if status.code == 403 => return Ok(()),
        Err(kube::Error::Api(status)) if status.code == 401 => {
            anyhow::bail!("the token is unknown or has expired: the server refused it")
        }
        Err(error) => return Err(anyhow::anyhow!("looking up node {name:?}: {error}")),
    };
    let ready = node
        .and_then(|n| n.status)
        .and_then(|s| s.conditions)
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    if ready {
        anyhow::bail!(
            "a node named {name:?} is already in the cluster and Ready: give this host another --node-name, \
             or delete that node first (kubectl delete node {name})"
        );
    }
    Ok(())
}
