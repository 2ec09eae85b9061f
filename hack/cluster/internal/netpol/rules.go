// Package netpol enforces Kubernetes NetworkPolicy (networking.k8s.io/v1) on the test
// cluster's bridge: what a CNI's policy engine does (Calico, Cilium, kube-router), for the
// one host every node agent's pods share. Pods are in network namespaces on one bridge
// whose traffic passes the host's iptables (bridge-nf-call-iptables), so a pod's traffic
// to another pod crosses the filter table's FORWARD chain with both pod IPs, after
// kube-proxy's DNAT of a Service address. Traffic to and from the host (probes, the API
// server, DNS) does not cross FORWARD and is always allowed, as NetworkPolicy specifies
// for a pod's node.
//
// Rules computes the whole rule set from the pods, namespaces and policies; the caller
// loads it with iptables-restore. Semantics, per the API's documentation:
//   - a pod selected by a policy whose policyTypes include Ingress (Egress) is isolated for
//     ingress (egress); traffic to (from) it is allowed only if some such policy allows it,
//     and a connection needs the sender's egress and the receiver's ingress allowed;
//   - a rule allows its peers (podSelector in the policy's namespace, namespaceSelector,
//     both together, ipBlock with except) on its ports (protocol, number or named port,
//     endPort); no peers means any peer, no ports means any port;
//   - replies of an allowed connection are allowed (conntrack).
package netpol

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"sort"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
)

// Chain is the chain FORWARD jumps to; per-pod chains are named ChainPrefix + a digest.
const (
	Chain       = "RECJOB-NETPOL"
	ChainPrefix = "RJNP-"
	egressMark  = "0x10000/0x10000"
	ingressMark = "0x20000/0x20000"
)

// State is what the rules are computed from.
type State struct {
	Pods       []*corev1.Pod
	Namespaces []*corev1.Namespace
	Policies   []*networkingv1.NetworkPolicy
}

// Ruleset is the filter table's part: chain names and rules ("-A ..." lines).
type Ruleset struct {
	Chains []string
	Rules  []string
}

type direction struct {
	name     string // "ingress" / "egress"
	policy   networkingv1.PolicyType
	mark     string
	own      string // the isolated pod's side: "-d" for ingress, "-s" for egress
	peerSide string
	letter   string
}

var (
	ingress = direction{"ingress", networkingv1.PolicyTypeIngress, ingressMark, "-d", "-s", "I"}
	egress  = direction{"egress", networkingv1.PolicyTypeEgress, egressMark, "-s", "-d", "E"}
)

// live reports whether a pod takes part in pod networking: it has an IP of its own
// (not the host's network) and has not ended.
func live(pod *corev1.Pod) bool {
	return pod.Status.PodIP != "" && !pod.Spec.HostNetwork &&
		pod.Status.Phase != corev1.PodSucceeded && pod.Status.Phase != corev1.PodFailed
}

// policyTypes is spec.policyTypes, or its documented default when empty.
func policyTypes(p *networkingv1.NetworkPolicy) []networkingv1.PolicyType {
	if len(p.Spec.PolicyTypes) > 0 {
		return p.Spec.PolicyTypes
	}
	out := []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
	if len(p.Spec.Egress) > 0 {
		out = append(out, networkingv1.PolicyTypeEgress)
	}
	return out
}

func has(types []networkingv1.PolicyType, t networkingv1.PolicyType) bool {
	for _, x := range types {
		if x == t {
			return true
		}
	}
	return false
}

func selector(s *metav1.LabelSelector) labels.Selector {
	if s == nil {
		return labels.Everything()
	}
	sel, err := metav1.LabelSelectorAsSelector(s)
	if err != nil {
		return labels.Nothing() // an invalid selector selects nothing
	}
	return sel
}

func digest(parts ...string) string {
	sum := sha256.Sum256([]byte(strings.Join(parts, "\x00")))
	return strings.ToUpper(hex.EncodeToString(sum[:]))[:16]
}

type builder struct {
	state      State
	namespaces map[string]map[string]string // name -> labels
	out        Ruleset
}

// Rules computes the rule set for state.
func Rules(state State) Ruleset {
	b := &builder{state: state, namespaces: map[string]map[string]string{}}
	for _, ns := range state.Namespaces {
		b.namespaces[ns.Name] = ns.Labels
	}
	b.out.Chains = []string{Chain}
	b.add(Chain, "-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT")
	b.add(Chain, "-j MARK --set-xmark 0x0/0x30000")
	pods := append([]*corev1.Pod(nil), state.Pods...)
	sort.Slice(pods, func(i, j int) bool { return pods[i].Namespace+"/"+pods[i].Name < pods[j].Namespace+"/"+pods[j].Name })
	// egress first: a packet from an isolated sender must be allowed to leave before its
	// receiver's ingress is looked at
	for _, dir := range []direction{egress, ingress} {
		for _, pod := range pods {
			if live(pod) {
				b.isolate(pod, dir)
			}
		}
	}
	return b.out
}

func (b *builder) add(chain, rule string) {
	b.out.Rules = append(b.out.Rules, fmt.Sprintf("-A %s %s", chain, rule))
}

// isolate adds the pod's chain for dir if any policy isolates it in that direction.
func (b *builder) isolate(pod *corev1.Pod, dir direction) {
	var selecting []*networkingv1.NetworkPolicy
	for _, p := range b.state.Policies {
		if p.Namespace == pod.Namespace && has(policyTypes(p), dir.policy) &&
			selector(&p.Spec.PodSelector).Matches(labels.Set(pod.Labels)) {
			selecting = append(selecting, p)
		}
	}
	if len(selecting) == 0 {
		return
	}
	chain := ChainPrefix + dir.letter + "-" + digest(string(pod.UID), pod.Status.PodIP)
	b.out.Chains = append(b.out.Chains, chain)
	ip := pod.Status.PodIP + "/32"
	b.add(Chain, fmt.Sprintf("%s %s -j %s", dir.own, ip, chain))
	b.add(Chain, fmt.Sprintf("%s %s -m mark ! --mark %s -m comment --comment %q -j REJECT",
		dir.own, ip, dir.mark, fmt.Sprintf("%s/%s %s", pod.Namespace, pod.Name, dir.name)))
	for _, p := range selecting {
		if dir.policy == networkingv1.PolicyTypeIngress {
			for i, rule := range p.Spec.Ingress {
				b.rule(chain, pod, p, dir, i, rule.From, rule.Ports)
			}
		} else {
			for i, rule := range p.Spec.Egress {
				b.rule(chain, pod, p, dir, i, rule.To, rule.Ports)
			}
		}
	}
}

// rule adds one ingress/egress rule of policy p to the pod's chain.
func (b *builder) rule(chain string, pod *corev1.Pod, p *networkingv1.NetworkPolicy, dir direction,
	index int, peers []networkingv1.NetworkPolicyPeer, ports []networkingv1.NetworkPolicyPort) {
	allow := fmt.Sprintf("-m comment --comment %q -j MARK --set-xmark %s",
		fmt.Sprintf("%s/%s %s[%d]", p.Namespace, p.Name, dir.name, index), dir.mark)
	if len(peers) == 0 {
		for _, match := range b.portMatches(ports, b.namedPortPods(pod, dir, nil)) {
			b.add(chain, strings.TrimSpace(match+" "+allow))
		}
		return
	}
	for j, peer := range peers {
		if peer.IPBlock != nil {
			// the CIDR is matched in the pod's chain, or, with excepts, by the jump to a
			// chain of its own where an except returns early
			target, source := chain, fmt.Sprintf("%s %s ", dir.peerSide, peer.IPBlock.CIDR)
			if len(peer.IPBlock.Except) > 0 {
				target = ChainPrefix + "B-" + digest(chain, p.Namespace, p.Name, dir.name, fmt.Sprint(index, j))
				b.out.Chains = append(b.out.Chains, target)
				b.add(chain, source+"-j "+target)
				for _, except := range peer.IPBlock.Except {
					b.add(target, fmt.Sprintf("%s %s -j RETURN", dir.peerSide, except))
				}
				source = ""
			}
			for _, match := range b.portMatches(ports, b.namedPortPods(pod, dir, nil)) {
				b.add(target, strings.TrimSpace(source+match+" "+allow))
			}
			continue
		}
		for _, other := range b.peerPods(p, peer) {
			for _, match := range b.portMatches(ports, b.namedPortPods(pod, dir, other)) {
				b.add(chain, strings.TrimSpace(fmt.Sprintf("%s %s/32 %s %s", dir.peerSide, other.Status.PodIP, match, allow)))
			}
		}
	}
}

// peerPods are the live pods a pod/namespace selector peer of policy p selects.
func (b *builder) peerPods(p *networkingv1.NetworkPolicy, peer networkingv1.NetworkPolicyPeer) []*corev1.Pod {
	var out []*corev1.Pod
	for _, pod := range b.state.Pods {
		if !live(pod) {
			continue
		}
		if peer.NamespaceSelector == nil {
			if pod.Namespace != p.Namespace {
				continue
			}
		} else if !selector(peer.NamespaceSelector).Matches(labels.Set(b.namespaces[pod.Namespace])) {
			continue
		}
		if peer.PodSelector != nil && !selector(peer.PodSelector).Matches(labels.Set(pod.Labels)) {
			continue
		}
		out = append(out, pod)
	}
	return out
}

// namedPortPods are the pods a named port is looked up in: the receiver's own for
// ingress; for egress the peer pod, or every live pod when the peer is not a pod.
func (b *builder) namedPortPods(pod *corev1.Pod, dir direction, peer *corev1.Pod) []*corev1.Pod {
	if dir.policy == networkingv1.PolicyTypeIngress {
		return []*corev1.Pod{pod}
	}
	if peer != nil {
		return []*corev1.Pod{peer}
	}
	return b.state.Pods
}

// portMatches are the iptables matches of a rule's ports (one "" for any port).
func (b *builder) portMatches(ports []networkingv1.NetworkPolicyPort, pods []*corev1.Pod) []string {
	if len(ports) == 0 {
		return []string{""}
	}
	var out []string
	for _, port := range ports {
		protocol := corev1.ProtocolTCP
		if port.Protocol != nil {
			protocol = *port.Protocol
		}
		proto := strings.ToLower(string(protocol))
		switch {
		case port.Port == nil:
			out = append(out, "-p "+proto)
		case port.Port.StrVal != "":
			for _, number := range namedPort(pods, port.Port.StrVal, protocol) {
				out = append(out, fmt.Sprintf("-p %s --dport %d", proto, number))
			}
		case port.EndPort != nil:
			out = append(out, fmt.Sprintf("-p %s --dport %d:%d", proto, port.Port.IntVal, *port.EndPort))
		default:
			out = append(out, fmt.Sprintf("-p %s --dport %d", proto, port.Port.IntVal))
		}
	}
	return out
}

// namedPort is the numbers the containers of pods give the port name (none: the rule
// allows nothing on it).
func namedPort(pods []*corev1.Pod, name string, protocol corev1.Protocol) []int32 {
	seen := map[int32]bool{}
	var out []int32
	for _, pod := range pods {
		for _, c := range pod.Spec.Containers {
			for _, cp := range c.Ports {
				p := cp.Protocol
				if p == "" {
					p = corev1.ProtocolTCP
				}
				if cp.Name == name && p == protocol && !seen[cp.ContainerPort] {
					seen[cp.ContainerPort] = true
					out = append(out, cp.ContainerPort)
				}
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// Restore is the iptables-restore input (with --noflush) that replaces every chain of
// ours with rules, and deletes the chains of ours in existing that rules no longer use.
func Restore(rules Ruleset, existing []string) string {
	var sb strings.Builder
	sb.WriteString("*filter\n")
	current := map[string]bool{}
	for _, c := range rules.Chains {
		current[c] = true
		fmt.Fprintf(&sb, ":%s - [0:0]\n", c)
	}
	var stale []string
	for _, c := range existing {
		if !current[c] && (c == Chain || strings.HasPrefix(c, ChainPrefix)) {
			stale = append(stale, c)
			fmt.Fprintf(&sb, ":%s - [0:0]\n", c)
		}
	}
	for _, r := range rules.Rules {
		sb.WriteString(r + "\n")
	}
	for _, c := range stale {
		fmt.Fprintf(&sb, "-X %s\n", c)
	}
	sb.WriteString("COMMIT\n")
	return sb.String()
}
