package agent

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
)

// Network hands out pod IPs from the node's pod CIDR and gives each pod a network
// namespace joined to the cluster bridge by a veth pair (what a CNI bridge plugin does).
type Network struct {
	Bridge  string     // the cluster bridge, created by `make cluster`
	Gateway net.IP     // the host's address on the bridge (API server, DNS)
	CIDR    *net.IPNet // this node's pod addresses
	Mask    int        // prefix length of the whole pod network (the bridge's)

	mu   sync.Mutex
	used map[string]bool
}

// NewNetwork parses the node's pod CIDR ("10.244.1.0/24").
func NewNetwork(bridge, gateway, podCIDR string, mask int) (*Network, error) {
	_, cidr, err := net.ParseCIDR(podCIDR)
	if err != nil {
		return nil, err
	}
	gw := net.ParseIP(gateway)
	if gw == nil {
		return nil, fmt.Errorf("bad gateway %q", gateway)
	}
	return &Network{Bridge: bridge, Gateway: gw, CIDR: cidr, Mask: mask, used: map[string]bool{}}, nil
}

func (n *Network) allocate() (net.IP, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	base := n.CIDR.IP.To4()
	ones, bits := n.CIDR.Mask.Size()
	for i := 2; i < 1<<(bits-ones)-1; i++ {
		ip := net.IPv4(base[0], base[1], base[2]+byte(i>>8), base[3]+byte(i&0xff)).To4()
		if !n.used[ip.String()] {
			n.used[ip.String()] = true
			return ip, nil
		}
	}
	return nil, fmt.Errorf("no free address in %s", n.CIDR)
}

func (n *Network) release(ip string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	delete(n.used, ip)
}

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Sandbox is one pod's network namespace.
type Sandbox struct {
	Namespace string // the netns name (/run/netns/<Namespace>)
	IP        net.IP
	hostVeth  string
}

// NetnsPath is what nsenter --net= takes.
func (s *Sandbox) NetnsPath() string { return filepath.Join("/run/netns", s.Namespace) }

// Create makes the pod's network namespace: loopback up, eth0 with the pod IP, default
// route through the bridge. id must be unique per pod and short (veth names <= 15 chars).
func (n *Network) Create(id string) (*Sandbox, error) {
	ip, err := n.allocate()
	if err != nil {
		return nil, err
	}
	s := &Sandbox{Namespace: "rj-" + id, IP: ip, hostVeth: "rjv" + id}
	_ = run("ip", "netns", "del", s.Namespace) // a leftover of a killed agent
	_ = run("ip", "link", "del", s.hostVeth)
	steps := [][]string{
		{"netns", "add", s.Namespace},
		{"link", "add", s.hostVeth, "type", "veth", "peer", "name", "eth0", "netns", s.Namespace},
		{"link", "set", s.hostVeth, "master", n.Bridge},
		{"link", "set", s.hostVeth, "up"},
		{"-n", s.Namespace, "link", "set", "lo", "up"},
		{"-n", s.Namespace, "addr", "add", fmt.Sprintf("%s/%d", ip, n.Mask), "dev", "eth0"},
		{"-n", s.Namespace, "link", "set", "eth0", "up"},
		{"-n", s.Namespace, "route", "add", "default", "via", n.Gateway.String()},
	}
	for _, step := range steps {
		if err := run("ip", step...); err != nil {
			n.Delete(s)
			return nil, err
		}
	}
	// a pod reaching its own Service through kube-proxy comes back over the same port
	_ = os.WriteFile(fmt.Sprintf("/sys/class/net/%s/brport/hairpin_mode", s.hostVeth), []byte("1"), 0o644)
	return s, nil
}

// Delete removes the pod's network namespace (its veth pair goes with it).
func (n *Network) Delete(s *Sandbox) {
	_ = run("ip", "netns", "del", s.Namespace)
	_ = run("ip", "link", "del", s.hostVeth)
	n.release(s.IP.String())
}
