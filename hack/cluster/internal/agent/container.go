package agent

import (
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"

	corev1 "k8s.io/api/core/v1"
)

// launch describes one start of a container: its argv, environment and the mounts the
// start script makes inside the container's own mount namespace.
type launch struct {
	argv    []string
	env     []string
	workdir string
	uid     int
	gid     int
	groups  []int64
	script  string
}

func shq(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

var varRef = regexp.MustCompile(`\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)`)

// expand does the kubelet's $(VAR) expansion of command and args ($$ escapes).
func expand(s string, env map[string]string) string {
	return varRef.ReplaceAllStringFunc(s, func(m string) string {
		if m == "$$" {
			return "$"
		}
		name := m[2 : len(m)-1]
		if v, ok := env[name]; ok {
			return v
		}
		return m
	})
}

func parseUser(user string) (uid, gid int, ok bool) {
	if user == "" {
		return 0, 0, true
	}
	parts := strings.SplitN(user, ":", 2)
	u, err := strconv.Atoi(parts[0])
	if err != nil {
		return 0, 0, false
	}
	g := u
	if len(parts) == 2 {
		if g, err = strconv.Atoi(parts[1]); err != nil {
			return 0, 0, false
		}
	}
	return u, g, true
}

// configError is what a kubelet reports as CreateContainerConfigError.
type configError struct{ msg string }

func (e configError) Error() string { return e.msg }

// buildLaunch resolves the container against its image and the pod: user (container
// securityContext over pod over image USER; runAsNonRoot enforced), argv with $(VAR)
// expansion, environment, and the mount script.
func buildLaunch(pod *corev1.Pod, c *corev1.Container, image Image, sb *podSandbox, volumes map[string]volumeSource, cdir string) (*launch, error) {
	uid, gid, ok := parseUser(image.User)
	if !ok {
		return nil, configError{fmt.Sprintf("image user %q is not numeric", image.User)}
	}
	var runAsNonRoot *bool
	readOnlyRoot, noNewPrivs := false, false
	groups := []int64{}
	if psc := pod.Spec.SecurityContext; psc != nil {
		if psc.RunAsUser != nil {
			uid = int(*psc.RunAsUser)
		}
		if psc.RunAsGroup != nil {
			gid = int(*psc.RunAsGroup)
		}
		runAsNonRoot = psc.RunAsNonRoot
		if psc.FSGroup != nil {
			groups = append(groups, *psc.FSGroup)
		}
		groups = append(groups, psc.SupplementalGroups...)
	}
	if sc := c.SecurityContext; sc != nil {
		if sc.RunAsUser != nil {
			uid = int(*sc.RunAsUser)
		}
		if sc.RunAsGroup != nil {
			gid = int(*sc.RunAsGroup)
		}
		if sc.RunAsNonRoot != nil {
			runAsNonRoot = sc.RunAsNonRoot
		}
		readOnlyRoot = sc.ReadOnlyRootFilesystem != nil && *sc.ReadOnlyRootFilesystem
		noNewPrivs = sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation
	}
	if runAsNonRoot != nil && *runAsNonRoot && uid == 0 {
		return nil, configError{"container has runAsNonRoot and image will run as root"}
	}

	env := map[string]string{"HOSTNAME": sb.hostname, "HOME": "/"}
	for k, v := range image.Env {
		env[k] = v
	}
	if _, ok := env["PATH"]; !ok {
		env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	}
	for _, e := range c.Env { // resolved by virtual-kubelet (valueFrom, envFrom, services)
		env[e.Name] = expand(e.Value, env)
	}
	argv := append([]string{}, image.Entrypoint...)
	args := image.Cmd
	if len(c.Command) > 0 {
		argv, args = append([]string{}, c.Command...), nil
	}
	if len(c.Args) > 0 {
		args = c.Args
	}
	argv = append(argv, args...)
	for i := range argv {
		argv[i] = expand(argv[i], env)
	}
	if len(argv) == 0 {
		return nil, configError{"no command specified"}
	}
	keys := make([]string, 0, len(env))
	for k := range env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	envList := make([]string, 0, len(keys))
	for _, k := range keys {
		envList = append(envList, k+"="+env[k])
	}
	workdir := c.WorkingDir
	if workdir == "" {
		workdir = image.WorkingDir
	}
	if workdir == "" {
		workdir = "/"
	}

	// mounts: (host source, container target, read-only, is a file)
	type mount struct {
		src, dst string
		ro, file bool
	}
	var mounts []mount
	targets := map[string]bool{}
	for _, vm := range c.VolumeMounts {
		src, ok := volumes[vm.Name]
		if !ok {
			return nil, configError{fmt.Sprintf("volumeMount %q: no such volume", vm.Name)}
		}
		host := src.path
		if vm.SubPath != "" {
			if strings.Contains(vm.SubPath, "..") || filepath.IsAbs(vm.SubPath) {
				return nil, configError{fmt.Sprintf("volumeMount %q: bad subPath %q", vm.Name, vm.SubPath)}
			}
			host = filepath.Join(host, vm.SubPath)
			_ = os.MkdirAll(host, 0o777)
		}
		info, err := os.Stat(host)
		if err != nil {
			return nil, configError{fmt.Sprintf("volumeMount %q: %v", vm.Name, err)}
		}
		mounts = append(mounts, mount{host, path.Clean(vm.MountPath), vm.ReadOnly, !info.IsDir()})
		targets[path.Clean(vm.MountPath)] = true
	}
	for dst, src := range image.Files {
		info, err := os.Stat(src)
		if err != nil {
			return nil, configError{fmt.Sprintf("image file %s: %v", dst, err)}
		}
		mounts = append(mounts, mount{src, dst, true, !info.IsDir()})
	}
	termination := c.TerminationMessagePath
	if termination == "" {
		termination = "/dev/termination-log"
	}
	mounts = append(mounts,
		mount{sb.hostsFile, "/etc/hosts", true, true},
		mount{sb.resolvFile, "/etc/resolv.conf", true, true},
		mount{sb.hostnameFile, "/etc/hostname", true, true},
		mount{filepath.Join(cdir, "termination-log"), termination, false, true},
	)
	if !targets["/dev/shm"] {
		mounts = append(mounts, mount{sb.shm, "/dev/shm", false, false})
	}
	sort.SliceStable(mounts, func(i, j int) bool { return strings.Count(mounts[i].dst, "/") < strings.Count(mounts[j].dst, "/") })

	// Mounts whose target is under /tmp go after the container's private /tmp is in
	// place; all others first, while the host's /tmp (e.g. hostPath PVs) is visible.
	var outer, tmp, inner []mount
	for _, m := range mounts {
		if m.dst == "/tmp" {
			tmp = append(tmp, m)
		} else if strings.HasPrefix(m.dst, "/tmp/") {
			inner = append(inner, m)
		} else {
			outer = append(outer, m)
		}
	}
	var s strings.Builder
	mkdirs := func(ms []mount) {
		for _, m := range ms {
			if m.file {
				fmt.Fprintf(&s, "[ -e %[1]s ] || { /usr/bin/mkdir -p %[2]s && : > %[1]s; }\n", shq(m.dst), shq(path.Dir(m.dst)))
			} else {
				fmt.Fprintf(&s, "/usr/bin/mkdir -p %s\n", shq(m.dst))
			}
		}
	}
	binds := func(ms []mount) {
		for _, m := range ms {
			fmt.Fprintf(&s, "/usr/bin/mount --bind %s %s\n", shq(m.src), shq(m.dst))
			if m.ro {
				fmt.Fprintf(&s, "/usr/bin/mount -o remount,bind,ro %s\n", shq(m.dst))
			}
		}
	}
	s.WriteString("set -e\n/usr/bin/mount --make-rprivate /\n")
	mkdirs(outer)
	fmt.Fprintf(&s, "/usr/bin/mkdir -p %s\n", shq(workdir)) // the image's WORKDIR
	binds(outer)
	if !targets["/tmp"] { // a container's /tmp is its own (read-only with a read-only root)
		fmt.Fprintf(&s, "/usr/bin/mount --bind %s /tmp\n", shq(filepath.Join(cdir, "tmp")))
	}
	binds(tmp)
	mkdirs(inner)
	binds(inner)
	if readOnlyRoot { // last: a bind made from a read-only mount would be read-only too
		s.WriteString("/usr/bin/mount -o remount,bind,ro /\n")
		if !targets["/tmp"] {
			s.WriteString("/usr/bin/mount -o remount,bind,ro /tmp\n")
		}
	}
	fmt.Fprintf(&s, "/usr/bin/hostname %s\ncd %s\n", shq(sb.hostname), shq(workdir))
	priv := []string{}
	if uid != 0 || gid != 0 || len(groups) > 0 {
		gs := "--clear-groups"
		if len(groups) > 0 {
			parts := []string{}
			for _, g := range groups {
				parts = append(parts, strconv.FormatInt(g, 10))
			}
			gs = "--groups=" + strings.Join(parts, ",")
		}
		priv = append(priv, "/usr/bin/setpriv", fmt.Sprintf("--reuid=%d", uid), fmt.Sprintf("--regid=%d", gid), gs)
		if noNewPrivs {
			priv = append(priv, "--no-new-privs")
		}
		priv = append(priv, "--")
	}
	fmt.Fprintf(&s, "exec %s \"$@\"\n", strings.Join(priv, " "))
	return &launch{argv: argv, env: envList, workdir: workdir, uid: uid, gid: gid, groups: groups, script: s.String()}, nil
}

// start runs the container: nsenter into the pod's network namespace, then new mount,
// UTS, IPC and PID namespaces (the container's process is PID 1 there, and every
// process it started dies with it), the mount script, then exec of argv.
func (l *launch) start(netns, cdir, logPath string) (*exec.Cmd, chan struct{}, error) {
	script := filepath.Join(cdir, "start.sh")
	if err := os.WriteFile(script, []byte(l.script), 0o700); err != nil {
		return nil, nil, err
	}
	for _, d := range []string{filepath.Join(cdir, "tmp")} {
		if err := os.MkdirAll(d, 0o777); err != nil {
			return nil, nil, err
		}
		_ = os.Chmod(d, 0o1777)
	}
	term := filepath.Join(cdir, "termination-log")
	if err := os.WriteFile(term, nil, 0o666); err != nil {
		return nil, nil, err
	}
	_ = os.Chmod(term, 0o666)
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, nil, err
	}
	args := []string{"--net=" + netns, "--", "/usr/bin/unshare", "--mount", "--uts", "--ipc", "--pid", "--fork",
		"--mount-proc", "--kill-child", "--", "/bin/sh", script}
	cmd := exec.Command("/usr/bin/nsenter", append(args, l.argv...)...)
	cmd.Env = l.env
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, nil, err
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); logFile.Close(); close(done) }()
	return cmd, done, nil
}

// exitCode of a finished container: its status, or 128+signal as a runtime reports it.
func exitCode(state *os.ProcessState) int32 {
	if ws, ok := state.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return int32(128 + int(ws.Signal()))
	}
	return int32(state.ExitCode())
}

// terminationMessage reads what the container left at its terminationMessagePath (at
// most 4096 bytes), or the tail of its log for FallbackToLogsOnError on failure.
func terminationMessage(c *corev1.Container, cdir, logPath string, code int32) string {
	data, _ := os.ReadFile(filepath.Join(cdir, "termination-log"))
	if len(data) > 4096 {
		data = data[:4096]
	}
	if len(data) == 0 && code != 0 && c.TerminationMessagePolicy == corev1.TerminationMessageFallbackToLogsOnError {
		logs, _ := os.ReadFile(logPath)
		lines := strings.Split(strings.TrimRight(string(logs), "\n"), "\n")
		if len(lines) > 80 {
			lines = lines[len(lines)-80:]
		}
		data = []byte(strings.Join(lines, "\n"))
		if len(data) > 2048 {
			data = data[len(data)-2048:]
		}
	}
	return string(data)
}
