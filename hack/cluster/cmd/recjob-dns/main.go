// Command recjob-dns is the RecJob test cluster's DNS: the records of Kubernetes' DNS
// specification that pods of this cluster use, served from watches of Services and
// EndpointSlices (what CoreDNS's kubernetes plugin does):
//
//	<service>.<ns>.svc.<domain>            A  ClusterIP, or the ready endpoints of a headless Service
//	<hostname>.<service>.<ns>.svc.<domain>  A  the endpoint with that hostname (headless)
//	<a-b-c-d>.<ns>.pod.<domain>             A  a-b-c-d
//
// Anything else is NXDOMAIN: this cluster has no upstream resolver.
package main

import (
	"flag"
	"log"
	"net"
	"strings"
	"time"

	"github.com/miekg/dns"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

type resolver struct {
	domain    string
	services  func(ns, name string) (*corev1.Service, error)
	endpoints func(ns, service string) ([]*discoveryv1.EndpointSlice, error)
}

// lookup answers one A question: the addresses for name, and whether the name exists.
func (r *resolver) lookup(name string) ([]net.IP, bool) {
	name = strings.TrimSuffix(strings.ToLower(name), ".")
	suffix := "." + r.domain
	if !strings.HasSuffix(name, suffix) {
		return nil, false
	}
	labels := strings.Split(strings.TrimSuffix(name, suffix), ".")
	switch {
	case len(labels) == 3 && labels[2] == "pod":
		ip := net.ParseIP(strings.ReplaceAll(labels[0], "-", "."))
		return []net.IP{ip}, ip != nil
	case len(labels) == 3 && labels[2] == "svc":
		return r.service(labels[1], labels[0], "")
	case len(labels) == 4 && labels[3] == "svc":
		return r.service(labels[2], labels[1], labels[0])
	}
	return nil, false
}

func (r *resolver) service(ns, name, hostname string) ([]net.IP, bool) {
	svc, err := r.services(ns, name)
	if err != nil {
		return nil, false
	}
	if hostname == "" && svc.Spec.ClusterIP != "" && svc.Spec.ClusterIP != corev1.ClusterIPNone {
		return []net.IP{net.ParseIP(svc.Spec.ClusterIP)}, true
	}
	slices, _ := r.endpoints(ns, name)
	var ips []net.IP
	for _, slice := range slices {
		for _, ep := range slice.Endpoints {
			ready := ep.Conditions.Ready == nil || *ep.Conditions.Ready
			if !ready && !svc.Spec.PublishNotReadyAddresses {
				continue
			}
			if hostname != "" && (ep.Hostname == nil || *ep.Hostname != hostname) {
				continue
			}
			for _, a := range ep.Addresses {
				ips = append(ips, net.ParseIP(a))
			}
		}
	}
	return ips, hostname == "" || len(ips) > 0
}

func (r *resolver) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(req)
	m.Authoritative = true
	for _, q := range req.Question {
		ips, exists := r.lookup(q.Name)
		if !exists {
			m.Rcode = dns.RcodeNameError
			continue
		}
		if q.Qtype != dns.TypeA && q.Qtype != dns.TypeANY {
			continue // NOERROR, no data (no AAAA here)
		}
		for _, ip := range ips {
			if ip4 := ip.To4(); ip4 != nil {
				m.Answer = append(m.Answer, &dns.A{
					Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 5}, A: ip4})
			}
		}
	}
	_ = w.WriteMsg(m)
}

func main() {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig")
	listen := flag.String("listen", "10.244.0.1:53", "address to serve DNS on (UDP and TCP)")
	domain := flag.String("cluster-domain", "cluster.local", "cluster domain")
	flag.Parse()
	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		log.Fatal(err)
	}
	client := kubernetes.NewForConfigOrDie(config)
	factory := informers.NewSharedInformerFactory(client, 10*time.Minute)
	services := factory.Core().V1().Services().Lister()
	slices := factory.Discovery().V1().EndpointSlices().Lister()
	stop := make(chan struct{})
	factory.Start(stop)
	factory.WaitForCacheSync(stop)
	r := &resolver{
		domain:   *domain,
		services: func(ns, name string) (*corev1.Service, error) { return services.Services(ns).Get(name) },
		endpoints: func(ns, service string) ([]*discoveryv1.EndpointSlice, error) {
			return slices.EndpointSlices(ns).List(labels.SelectorFromSet(labels.Set{discoveryv1.LabelServiceName: service}))
		},
	}
	errs := make(chan error, 2)
	for _, proto := range []string{"udp", "tcp"} {
		server := &dns.Server{Addr: *listen, Net: proto, Handler: r}
		go func() { errs <- server.ListenAndServe() }()
	}
	log.Printf("recjob-dns serving %s on %s", *domain, *listen)
	log.Fatal(<-errs)
}
