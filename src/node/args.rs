//! `margay node run`'s flags and environment (Calico's names where Calico has them), and the node address
//! settings they parse into.

#[allow(unused_imports)]
use super::*;

/// `margay node run` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// This node's name (default: the host name).
    #[arg(long, env = "NODENAME")]
    pub node_name: Option<String>,
    /// Network namespace of the dataplane (a path like /var/run/netns/NODE; default: the current one).
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// The node's IPv4 address, or `autodetect` (as Calico's IP; the default): found by
    /// --ip-autodetection-method and re-checked every --ip-recheck-interval.
    #[arg(long, env = "IP", value_parser = parse_node_ip)]
    pub ip: Option<NodeIp>,
    /// The node's IPv6 address: the next hop of its IPv6 routes (pod blocks of IPv6 pools), carried over the
    /// IPv4 sessions (MP-BGP). Without it, IPv6 blocks are blackholed locally but not advertised.
    /// `autodetect` finds it with --ip6-autodetection-method and re-checks it every --ip-recheck-interval, as
    /// Calico's IP6=autodetect; `none` or unset: no IPv6 address.
    #[arg(long, env = "IP6", value_parser = parse_node_ip6)]
    pub ip6: Option<NodeIp6>,
    /// How IP6=autodetect finds the address (Calico's IP6_AUTODETECTION_METHOD): first-found,
    /// interface=REGEX[,REGEX] or skip-interface=REGEX[,REGEX].
    #[arg(long, env = "IP6_AUTODETECTION_METHOD", default_value = "first-found", value_parser = crate::dataplane::autodetect::parse_method)]
    pub ip6_autodetection_method: crate::dataplane::autodetect::Method,
    /// How to find the node address when --ip is not given (Calico's IP_AUTODETECTION_METHOD): first-found,
    /// interface=REGEX[,REGEX], skip-interface=REGEX[,REGEX], can-reach=IP|HOSTNAME or cidr=CIDR[,CIDR].
    #[arg(long, env = "MARGAY_IP_AUTODETECTION_METHOD", default_value = "first-found", value_parser = crate::dataplane::autodetect::parse_method)]
    pub ip_autodetection_method: crate::dataplane::autodetect::Method,
    /// The CNI socket margay-cni connects to.
    #[arg(long, env = "MARGAY_CNI_SOCKET", default_value = DEFAULT_SOCKET)]
    pub cni_socket: PathBuf,
    /// Local HTTP endpoint for /status, /healthz, /readyz and /metrics.
    #[arg(long, env = "MARGAY_HTTP_LISTEN", default_value = api::DEFAULT_LISTEN)]
    pub http_listen: SocketAddr,
    /// The default IPv4 pool, created when no pool exists.
    #[arg(long, env = "MARGAY_IPV4POOL_CIDR", default_value = "192.168.0.0/16")]
    pub ipv4_pool_cidr: ipnetwork::Ipv4Network,
    /// Block size of the default pool.
    #[arg(long, env = "MARGAY_IPV4POOL_BLOCK_SIZE", default_value_t = 26)]
    pub ipv4_pool_block_size: u8,
    /// This node's AS number (written to its Node resource; default: BGPConfiguration's, else 64512).
    #[arg(long, env = "AS")]
    pub as_number: Option<u32>,
    /// MTU of pod interfaces when the CNI configuration gives none. Unset or 0: detected as Calico does,
    /// the smallest MTU of the up interfaces matching --mtu-iface-pattern minus the encapsulation overhead
    /// of the pools (VXLAN 50, VXLAN IPv6 70, IPIP 20), re-detected every 30 s and on pool changes.
    #[arg(long, env = "MARGAY_POD_MTU")]
    pub pod_mtu: Option<u32>,
    /// The interfaces whose MTU bounds the pod MTU (Felix's MTUIfacePattern).
    #[arg(long, env = "FELIX_MTUIFACEPATTERN", default_value = crate::dataplane::mtu::DEFAULT_IFACE_PATTERN)]
    pub mtu_iface_pattern: String,
    /// A default IPv6 pool, created when the variable is set and no IPv6 pool exists (Calico:
    /// CALICO_IPV6POOL_CIDR). Pods then get an IPv6 address beside their IPv4 one (dual stack); set IP6 so
    /// the node's IPv6 blocks are advertised.
    #[arg(long, env = "MARGAY_IPV6POOL_CIDR")]
    pub ipv6_pool_cidr: Option<ipnetwork::Ipv6Network>,
    /// Block size of the default IPv6 pool.
    #[arg(long, env = "MARGAY_IPV6POOL_BLOCK_SIZE", default_value_t = 122)]
    pub ipv6_pool_block_size: u8,
    /// After a start, how long (seconds) to wait for configured peers that are not Established before
    /// judging convergence on the Established ones alone.
    #[arg(long, env = "MARGAY_CONVERGE_MIN_WAIT", default_value_t = restart::CONVERGE_MIN_WAIT.as_secs())]
    pub converge_min_wait: u64,
    /// The bound (seconds) on the wait for End-of-RIB after a start; then stale routes are swept anyway.
    #[arg(long, env = "MARGAY_CONVERGE_MAX_WAIT", default_value_t = restart::CONVERGE_MAX_WAIT.as_secs())]
    pub converge_max_wait: u64,
    /// BGP password Secrets (BGPPeer/BGPConfiguration `secretKeyRef {name, key}`) as files
    /// `<dir>/<name>/<key>`: mount each Secret at `<dir>/<name>`. Re-read on every configuration change.
    #[arg(
        long,
        env = "MARGAY_BGP_SECRETS_DIR",
        default_value = "/etc/margay/bgp-secrets"
    )]
    pub bgp_secrets_dir: PathBuf,
    /// Calico's `natOutgoingAddress` (IPv4): traffic of natOutgoing pools leaving for outside every pool is
    /// SNATed to this address instead of masqueraded to the outgoing interface's address.
    #[arg(long, env = "FELIX_NATOUTGOINGADDRESS")]
    pub nat_outgoing_address: Option<Ipv4Addr>,
    /// How pod routes travel (Calico's CALICO_NETWORKING_BACKEND): `bird` (BGP, the default) or `vxlan` (no
    /// BGP session at all: routes from the IPAM blocks' affinities, through VXLAN; pools need vxlanMode).
    #[arg(long, env = "CALICO_NETWORKING_BACKEND", default_value = "bird", value_parser = ["bird", "bgp", "vxlan"])]
    pub networking_backend: String,
    /// Where the node keeps its run marker (default: the directory of --cni-socket, a hostPath that
    /// survives a daemon restart but not a reboot). When an earlier run's marker is there at start, the
    /// node announces itself as restarting (graceful restart R bit, RFC 4724 3), as the reflector does.
    #[arg(long, env = "MARGAY_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// With an autodetected address (no --ip), detect it again this often (seconds; 0: never), as Calico
    /// does every 60 s: on a change the Node resource is updated, the other nodes re-peer with the new
    /// address and this node announces its routes with it as next hop.
    #[arg(long, env = "MARGAY_IP_RECHECK_INTERVAL", default_value_t = 60)]
    pub ip_recheck_interval: u64,
    /// How long an affine IPAM block must stay empty before this node releases it (Go duration; the node
    /// keeps one block per pool). IPAMConfiguration `emptyBlockGracePeriod` overrides it.
    #[arg(long, env = "MARGAY_IPAM_EMPTY_BLOCK_GRACE", default_value = "15m", value_parser = crate::config::bgp::parse_duration)]
    pub ipam_empty_block_grace: Duration,
    /// How long a released address is not handed out again unless the pools have nothing else (Go
    /// duration). IPAMConfiguration `releasedAddressCooldown` overrides it.
    #[arg(long, env = "MARGAY_IPAM_RELEASE_COOLDOWN", default_value = "30s", value_parser = crate::config::bgp::parse_duration)]
    pub ipam_release_cooldown: Duration,
    /// TTL of the node's liveness lease in etcd (`margay ipam gc` releases nodes whose lease is gone).
    #[arg(long, env = "MARGAY_LIVENESS_TTL", default_value = "15s", value_parser = crate::config::bgp::parse_duration)]
    pub liveness_ttl: Duration,
    /// Take part in electing (through etcd) the one node that runs `ipam gc --release` on its own every
    /// minute, for nodes whose liveness has been gone longer than --ipam-gc-grace. Off by default.
    #[arg(long, env = "MARGAY_IPAM_GC_LEADER")]
    pub ipam_gc_leader: bool,
    /// With --ipam-gc-leader: how long a node must have been seen missing before it is released.
    #[arg(long, env = "MARGAY_IPAM_GC_GRACE", default_value = "15m", value_parser = crate::config::bgp::parse_duration)]
    pub ipam_gc_grace: Duration,
    /// Serve Docker's remote network and IPAM driver (`docker network create --driver margay --ipam-driver
    /// margay`) on this unix socket (bare flag: /run/docker/plugins/margay.sock, where Docker finds it).
    /// See docs/docker.md.
    #[arg(long, env = "MARGAY_DOCKER_PLUGIN", num_args = 0..=1, default_missing_value = crate::docker::DEFAULT_SOCKET, value_name = "SOCKET")]
    pub docker_plugin: Option<PathBuf>,
    /// With --docker-plugin: the local Docker API, through which networks defined on other hosts are
    /// created here and new networks are read to share them (etcd /margay/docker/v1/networks/).
    #[arg(long, env = "MARGAY_DOCKER_HOST", default_value = crate::docker::DEFAULT_DOCKER_HOST)]
    pub docker_host: String,
    /// This node forwards for hosts outside the cluster (the `--via` node of `margay routes`, or the next
    /// hop an outside router uses): `margay status` then says so and checks the kernel settings that needs
    /// (forwarding on, no strict reverse-path filtering on its interfaces), naming each wrong one with the
    /// fix. margay reports them and changes none but forwarding (which every node turns on, as Felix does).
    #[arg(long, env = "MARGAY_GATEWAY")]
    pub gateway: bool,
}

/// `--ip` / `IP` as Calico takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeIp {
    Address(Ipv4Addr),
    /// Found by the autodetection method (and re-checked).
    Autodetect,
    /// `none`: an IPv6-only node (IP6 gives its address). Its BGP router id is derived from the node name
    /// as Calico's `CALICO_ROUTER_ID=hash` does.
    None,
}

impl NodeIp {
    /// The fixed address, or `None` when it is autodetected or absent.
    pub fn fixed(self) -> Option<Ipv4Addr> {
        match self {
            NodeIp::Address(a) => Some(a),
            NodeIp::Autodetect | NodeIp::None => None,
        }
    }
}

/// Calico's router id for nodes without an IPv4 address (`CALICO_ROUTER_ID=hash`, confd's util.go): the
/// first four octets of sha256(node name), the first one lowered by 32 when it is above 223 (so the id is
/// never a multicast or reserved address).
pub fn router_id_from_name(name: &str) -> Ipv4Addr {
    use sha2::Digest;
    let h = sha2::Sha256::digest(name.as_bytes());
    let mut o = [h[0], h[1], h[2], h[3]];
    if o[0] > 223 {
        o[0] -= 32;
    }
    Ipv4Addr::from(o)
}

/// `--ip6` / `IP6` as Calico takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeIp6 {
    Address(std::net::Ipv6Addr),
    /// Found by the IPv6 autodetection method (and re-checked).
    Autodetect,
    /// `none`: the node has no IPv6 address.
    None,
}

/// `fd00::1`, `fd00::1/64`, `autodetect` or `none` (an empty value is `none`).
pub fn parse_node_ip6(s: &str) -> Result<NodeIp6, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("autodetect") {
        return Ok(NodeIp6::Autodetect);
    }
    if t.is_empty() || t.eq_ignore_ascii_case("none") {
        return Ok(NodeIp6::None);
    }
    t.split('/')
        .next()
        .unwrap_or(t)
        .parse::<std::net::Ipv6Addr>()
        .map(NodeIp6::Address)
        .map_err(|_| format!("{s:?} is not an IPv6 address, \"autodetect\" or \"none\""))
}

/// `10.0.0.1`, `10.0.0.1/24` (Calico accepts the CIDR form; the prefix length is read from the interface)
/// `autodetect` or `none` (an IPv6-only node, which then needs IP6).
pub fn parse_node_ip(s: &str) -> Result<NodeIp, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("autodetect") || t.is_empty() {
        return Ok(NodeIp::Autodetect);
    }
    if t.eq_ignore_ascii_case("none") {
        return Ok(NodeIp::None);
    }
    t.split('/')
        .next()
        .unwrap_or(t)
        .parse::<Ipv4Addr>()
        .map(NodeIp::Address)
        .map_err(|_| format!("{s:?} is not an IPv4 address, \"autodetect\" or \"none\""))
}
