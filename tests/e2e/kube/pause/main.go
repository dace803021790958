// Command pause is the sandbox ("pause") image's process for the e2e tests'
// real node: it holds a pod's namespaces and exits on SIGTERM or SIGINT. No
// registry is reachable from the test machines, so it is built here.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
}
