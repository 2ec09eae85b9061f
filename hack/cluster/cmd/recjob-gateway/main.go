// Command recjob-gateway is the RecJob test cluster's Gateway API data plane: it
// implements one Gateway (--gateway) of a GatewayClass whose controllerName is
// --controller-name, the way Envoy Gateway or Istio would on a real cluster, for real HTTP
// traffic on --listen:
//
//   - HTTPRoutes (gateway.networking.k8s.io/v1) with a parentRef to the Gateway, accepted
//     by its HTTP listeners' allowedRoutes, are matched per the Gateway API (hostnames,
//     PathPrefix/Exact paths, Exact headers, query parameters and method, with its
//     precedence rules);
//   - the matched rule's backendRefs (core Services of the route's namespace) are chosen
//     at random by weight and the request proxied to the Service's ClusterIP and port;
//   - status is written: HTTPRoute status.parents (Accepted, ResolvedRefs), Gateway
//     (Accepted, Programmed, listeners with attachedRoutes) and GatewayClass (Accepted).
//
// Not implemented: TLS, ReferenceGrant (cross-namespace backends are refused), filters,
// RegularExpression matches (routes using them are not accepted), timeouts, retries,
// listener hostnames and ports (every HTTP listener is served on --listen).
package main

import (
	"context"
	"errors"
	"flag"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/util/workqueue"

	"recjob.dev/hack/cluster/internal/gateway"
)

func main() {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig (empty: in-cluster configuration)")
	listen := flag.String("listen", "10.244.0.1:8081", "address to serve HTTP on")
	gatewayName := flag.String("gateway", "recjob-gateway/recjob", "the Gateway to implement, namespace/name")
	controllerName := flag.String("controller-name", "recjob.dev/test-gateway", "GatewayClass controllerName handled")
	flag.Parse()
	log.SetPrefix("recjob-gateway: ")
	namespace, name, ok := strings.Cut(*gatewayName, "/")
	host, _, err := net.SplitHostPort(*listen)
	if !ok || namespace == "" || name == "" || err != nil {
		log.Fatalf("--gateway must be namespace/name and --listen host:port (got %q, %q)", *gatewayName, *listen)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()

	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		log.Fatal(err)
	}
	c, stopInformers := start(ctx, dynamic.NewForConfigOrDie(config), kubernetes.NewForConfigOrDie(config),
		namespace, name, *controllerName, host)
	defer stopInformers()
	if c == nil {
		log.Print("stopped before the caches synced")
		return
	}
	proxy := gateway.NewProxy(c.table, c.service, rand.IntN, log.Printf, nil)
	server := &http.Server{Addr: *listen, Handler: proxy, ReadHeaderTimeout: 30 * time.Second}
	errs := make(chan error, 1)
	go func() { errs <- server.ListenAndServe() }()
	log.Printf("serving Gateway %s (controller %s) on http://%s", *gatewayName, *controllerName, *listen)
	select {
	case err := <-errs:
		log.Fatal(err)
	case <-ctx.Done():
	}
	log.Print("stopping")
	shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := server.Shutdown(shutdown); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		log.Print(err)
	}
}

// start makes the controller, starts the informers and its status worker once the caches
// are synced (nil if ctx ends before); stop shuts the queue and informers down.
func start(ctx context.Context, client dynamic.Interface, kube kubernetes.Interface,
	namespace, name, controllerName, address string) (*controller, func()) {
	typed := informers.NewSharedInformerFactory(kube, 10*time.Minute)
	routesFactory := dynamicinformer.NewDynamicSharedInformerFactory(client, 10*time.Minute)
	gatewayFactory := dynamicinformer.NewFilteredDynamicSharedInformerFactory(client, 10*time.Minute, namespace,
		func(o *metav1.ListOptions) { o.FieldSelector = "metadata.name=" + name })
	routeInformer := routesFactory.ForResource(httpRoutes)
	gatewayInformer := gatewayFactory.ForResource(gateways)
	serviceInformer := typed.Core().V1().Services()
	c := &controller{
		namespace: namespace, name: name, controllerName: controllerName, address: address, client: client,
		routes: routeInformer.Lister(), gateways: gatewayInformer.Lister(), services: serviceInformer.Lister(),
		queue: workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[string]()),
	}
	c.current.Store(&snapshot{table: &gateway.Table{}})
	stop := func() {
		c.queue.ShutDown()
		typed.Shutdown()
		routesFactory.Shutdown()
		gatewayFactory.Shutdown()
	}
	for informer, handler := range map[cache.SharedIndexInformer]cache.ResourceEventHandler{
		routeInformer.Informer():   c.routeHandler(),
		gatewayInformer.Informer(): c.gatewayHandler(),
		serviceInformer.Informer(): c.serviceHandler(),
	} {
		if _, err := informer.AddEventHandler(handler); err != nil {
			log.Fatal(err)
		}
	}
	typed.Start(ctx.Done())
	routesFactory.Start(ctx.Done())
	gatewayFactory.Start(ctx.Done())
	log.Printf("waiting for the caches of Services, HTTPRoutes and Gateway %s/%s (Gateway API CRDs installed?)", namespace, name)
	if !cache.WaitForCacheSync(ctx.Done(), routeInformer.Informer().HasSynced,
		gatewayInformer.Informer().HasSynced, serviceInformer.Informer().HasSynced) {
		return nil, stop
	}
	c.synced.Store(true)
	c.rebuild()
	c.queue.Add(gatewayKey)
	go c.run(ctx)
	return c, stop
}
