// Command recjob-netpol enforces NetworkPolicy on the RecJob test cluster (package
// internal/netpol): it watches pods, namespaces and NetworkPolicies and, on each change,
// loads the whole rule set into the host's filter table with iptables-restore, with a jump
// from the first rule of FORWARD. --cleanup removes the chains and the jump.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"log"
	"os/exec"
	"strings"
	"sync/atomic"
	"time"

	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	networkinglisters "k8s.io/client-go/listers/networking/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"

	"recjob.dev/hack/cluster/internal/netpol"
)

func run(name string, input string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	if input != "" {
		cmd.Stdin = strings.NewReader(input)
	}
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, errOut.String())
	}
	return out.String(), nil
}

// ourChains lists the filter table's chains of ours.
func ourChains() ([]string, error) {
	out, err := run("iptables", "", "-w", "-t", "filter", "-S")
	if err != nil {
		return nil, err
	}
	var chains []string
	for _, line := range strings.Split(out, "\n") {
		fields := strings.Fields(line)
		if len(fields) == 2 && fields[0] == "-N" &&
			(fields[1] == netpol.Chain || strings.HasPrefix(fields[1], netpol.ChainPrefix)) {
			chains = append(chains, fields[1])
		}
	}
	return chains, nil
}

// ensureJump keeps "-j RECJOB-NETPOL" the first rule of FORWARD (kube-proxy inserts its
// own jumps too; an ACCEPT before ours would let a connection past the policies).
func ensureJump() error {
	out, err := run("iptables", "", "-w", "-t", "filter", "-S", "FORWARD", "2")
	if err == nil && strings.TrimSpace(out) == "-A FORWARD -j "+netpol.Chain {
		return nil
	}
	for {
		if _, err := run("iptables", "", "-w", "-t", "filter", "-D", "FORWARD", "-j", netpol.Chain); err != nil {
			break // none left
		}
	}
	_, err = run("iptables", "", "-w", "-t", "filter", "-I", "FORWARD", "1", "-j", netpol.Chain)
	return err
}

func cleanup() {
	for {
		if _, err := run("iptables", "", "-w", "-t", "filter", "-D", "FORWARD", "-j", netpol.Chain); err != nil {
			break
		}
	}
	chains, err := ourChains()
	if err != nil {
		log.Fatal(err)
	}
	if _, err := run("iptables-restore", netpol.Restore(netpol.Ruleset{}, chains), "-w", "--noflush"); err != nil {
		log.Fatal(err)
	}
}

func main() {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig")
	clean := flag.Bool("cleanup", false, "remove the chains and the FORWARD jump, then exit")
	resync := flag.Duration("resync", 30*time.Second, "reload the rules at least this often")
	flag.Parse()
	if *clean {
		cleanup()
		return
	}
	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		log.Fatal(err)
	}
	client := kubernetes.NewForConfigOrDie(config)
	factory := informers.NewSharedInformerFactory(client, 10*time.Minute)
	pods := factory.Core().V1().Pods()
	namespaces := factory.Core().V1().Namespaces()
	policies := factory.Networking().V1().NetworkPolicies()
	var dirty atomic.Bool
	dirty.Store(true)
	mark := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { dirty.Store(true) },
		UpdateFunc: func(any, any) { dirty.Store(true) },
		DeleteFunc: func(any) { dirty.Store(true) },
	}
	for _, informer := range []cache.SharedIndexInformer{pods.Informer(), namespaces.Informer(), policies.Informer()} {
		if _, err := informer.AddEventHandler(mark); err != nil {
			log.Fatal(err)
		}
	}
	stop := make(chan struct{})
	factory.Start(stop)
	factory.WaitForCacheSync(stop)
	log.Printf("recjob-netpol enforcing NetworkPolicy (chain %s)", netpol.Chain)
	last := time.Time{}
	for {
		if dirty.Swap(false) || time.Since(last) > *resync {
			last = time.Now()
			if err := sync(pods.Lister(), namespaces.Lister(), policies.Lister()); err != nil {
				log.Printf("sync failed (retrying): %v", err)
				dirty.Store(true)
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func sync(pods corelisters.PodLister, namespaces corelisters.NamespaceLister,
	policies networkinglisters.NetworkPolicyLister) error {
	var state netpol.State
	var err error
	if state.Pods, err = pods.List(labels.Everything()); err != nil {
		return err
	}
	if state.Namespaces, err = namespaces.List(labels.Everything()); err != nil {
		return err
	}
	if state.Policies, err = policies.List(labels.Everything()); err != nil {
		return err
	}
	rules := netpol.Rules(state)
	existing, err := ourChains()
	if err != nil {
		return err
	}
	if _, err := run("iptables-restore", netpol.Restore(rules, existing), "-w", "--noflush"); err != nil {
		return err
	}
	return ensureJump()
}
