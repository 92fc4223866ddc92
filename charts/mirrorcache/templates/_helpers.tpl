{{/* Names and labels. */}}
{{- define "mirrorcache.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mirrorcache.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "mirrorcache.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "mirrorcache.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "mirrorcache.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mirrorcache.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "mirrorcache.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "mirrorcache.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "mirrorcache.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mirrorcache.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "mirrorcache.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Where the pod sees its files (one place: config, volumes and tests agree). */}}
{{- define "mirrorcache.configDir" -}}/etc/mirrorcache/config{{- end -}}
{{- define "mirrorcache.policyDir" -}}/etc/mirrorcache/policy{{- end -}}
{{- define "mirrorcache.authDir" -}}/etc/mirrorcache/auth{{- end -}}
{{- define "mirrorcache.tlsDir" -}}/etc/mirrorcache/tls{{- end -}}
{{- define "mirrorcache.upstreamSecretDir" -}}/etc/mirrorcache/upstreams{{- end -}}

{{- define "mirrorcache.tlsSecretName" -}}
{{- if .Values.tls.certManager.enabled -}}
{{- printf "%s-tls" (include "mirrorcache.fullname" .) -}}
{{- else -}}
{{- .Values.tls.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "mirrorcache.policyConfigMapName" -}}
{{- default (printf "%s-policy" (include "mirrorcache.fullname" .)) .Values.policy.existingConfigMap -}}
{{- end -}}

{{- define "mirrorcache.scheme" -}}
{{- if .Values.tls.enabled -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{/* "true" when replicas can share the cache (the S3 backend). */}}
{{- define "mirrorcache.sharedStorage" -}}
{{- if eq .Values.storage.type "s3" -}}true{{- end -}}
{{- end -}}

{{/* "true" when the pods form a cluster (peers coalesce fetches between replicas). */}}
{{- define "mirrorcache.clusterEnabled" -}}
{{- if .Values.cluster.enabled -}}true{{- end -}}
{{- end -}}

{{/* A Kubernetes quantity (10Gi, 500M) as a mirrorcache size (10GiB, 500M). */}}
{{- define "mirrorcache.size" -}}
{{- if hasSuffix "i" . -}}{{ . }}B{{- else -}}{{ . }}{{- end -}}
{{- end -}}

{{/* Where the cache volume is mounted: the filesystem store, or the S3 local tier. */}}
{{- define "mirrorcache.cachePath" -}}
{{- if eq .Values.storage.type "s3" -}}{{ .Values.storage.s3.localCache.path }}{{- else -}}{{ .Values.storage.filesystem.path }}{{- end -}}
{{- end -}}

{{- define "mirrorcache.peerSecretName" -}}
{{- default (printf "%s-peer" (include "mirrorcache.fullname" .)) .Values.cluster.peerSecret.existingSecret -}}
{{- end -}}

{{- define "mirrorcache.peersServiceName" -}}
{{- printf "%s-peers" (include "mirrorcache.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "mirrorcache.clusterDir" -}}/etc/mirrorcache/cluster{{- end -}}

{{/*
Refuse values this mirrorcache version cannot serve, with a message saying why.
Included by the ConfigMap, so every render checks it.
*/}}
{{- define "mirrorcache.validate" -}}
{{- $v := .Values -}}
{{- if $v.mirroring -}}
{{- fail "mirroring entries (scheduled mirroring) are not implemented by this mirrorcache version (appVersion 0.1.0): set mirroring: [] (pins keep images cached: see pins)" -}}
{{- end -}}
{{- if and (gt (int $v.replicaCount) 1) (not (include "mirrorcache.sharedStorage" .)) -}}
{{- fail (printf "replicaCount=%d needs shared storage: a filesystem cache (with its sqlite metadata) belongs to one pod; use replicaCount: 1 or storage.type=s3" (int $v.replicaCount)) -}}
{{- end -}}
{{- if and $v.autoscaling.enabled (not (include "mirrorcache.sharedStorage" .)) -}}
{{- fail "autoscaling.enabled needs shared storage (storage.type=s3): a filesystem cache belongs to one pod" -}}
{{- end -}}
{{- if and $v.cluster.enabled (not (include "mirrorcache.sharedStorage" .)) -}}
{{- fail "cluster.enabled needs shared storage (storage.type=s3): cluster peers are replicas sharing one bucket" -}}
{{- end -}}
{{- if eq $v.storage.type "s3" -}}
{{- if and $v.storage.s3.localCache.persistence.enabled (or (gt (int $v.replicaCount) 1) $v.autoscaling.enabled) (not $v.storage.s3.localCache.persistence.existingClaim) -}}
{{- fail "storage.s3.localCache.persistence.enabled gives one ReadWriteOnce claim, which several replicas cannot share: use the emptyDir local tier (persistence.enabled: false) with replicaCount > 1 or autoscaling" -}}
{{- end -}}
{{- if and (or (gt (int $v.replicaCount) 1) $v.autoscaling.enabled) $v.storage.s3.localCache.persistence.existingClaim -}}
{{- fail "storage.s3.localCache.persistence.existingClaim is one volume for one pod: not with replicaCount > 1 or autoscaling" -}}
{{- end -}}
{{- if $v.storage.maxSize -}}
{{- fail "storage.maxSize bounds the filesystem cache; with storage.type=s3 bound the local tier with storage.s3.localCache.maxSize (the bucket is not size-limited here)" -}}
{{- end -}}
{{- end -}}
{{- if and $v.tls.enabled (not $v.tls.existingSecret) (not $v.tls.certManager.enabled) -}}
{{- fail "tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret) or tls.certManager.enabled" -}}
{{- end -}}
{{- if and $v.tls.certManager.enabled (not $v.tls.certManager.issuerRef.name) -}}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef.name" -}}
{{- end -}}
{{- if and $v.auth.enabled (not $v.auth.htpasswd.existingSecret) (not $v.auth.tokens.existingSecret) -}}
{{- fail "auth.enabled needs auth.htpasswd.existingSecret or auth.tokens.existingSecret" -}}
{{- end -}}
{{- if and $v.nodeConfig.enabled (not $v.nodeConfig.mirrorHost) -}}
{{- fail "nodeConfig.enabled needs nodeConfig.mirrorHost: the address containerd on the nodes uses to reach the mirror (nodes do not resolve cluster DNS)" -}}
{{- end -}}
{{- if and $v.config.defaultUpstream (not (hasKey $v.config.upstreams $v.config.defaultUpstream)) -}}
{{- fail (printf "config.defaultUpstream %q is not one of config.upstreams" $v.config.defaultUpstream) -}}
{{- end -}}
{{- end -}}

{{/* The mirrorcache config file. */}}
{{- define "mirrorcache.config" -}}
{{- $v := .Values -}}
{{- $upstreams := dict -}}
{{- range $i, $name := keys $v.config.upstreams | sortAlpha -}}
{{- $up := omit (index $v.config.upstreams $name) "credentials" -}}
{{- with (index $v.config.upstreams $name).credentials -}}
{{- $_ := set $up "username" .username -}}
{{- if eq (default "file" .as) "env" -}}
{{- $_ := set $up "password_env" (printf "MIRRORCACHE_UPSTREAM_%d_PASSWORD" $i) -}}
{{- else -}}
{{- $_ := set $up "password_file" (printf "%s/%d/password" (include "mirrorcache.upstreamSecretDir" $) $i) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $upstreams $name $up -}}
{{- end -}}
{{- $cfg := dict
  "listen" (printf "0.0.0.0:%d" (int $v.config.port))
  "workers" (int $v.config.workers)
  "event_loop" $v.config.eventLoop
  "shutdown_grace" $v.config.shutdownGrace
  "storage" (include "mirrorcache.storageConfig" . | fromYaml)
  "upstreams" $upstreams
  "log" (dict "level" $v.config.log.level "format" $v.config.log.format) -}}
{{- if $v.config.defaultUpstream -}}
{{- $_ := set $cfg "default_upstream" $v.config.defaultUpstream -}}
{{- end -}}
{{- with $v.retention.unusedFor -}}
{{- $_ := set $cfg "retention" (dict "unused_for" .) -}}
{{- end -}}
{{- with $v.pins -}}
{{- $_ := set $cfg "pins" . -}}
{{- end -}}
{{- if $v.cluster.enabled -}}
{{- $c := $v.cluster -}}
{{- $peers := $c.peers -}}
{{- if not $peers -}}
{{- $peers = dict "dns" (printf "%s.%s.svc.%s:%d" (include "mirrorcache.peersServiceName" .) .Release.Namespace $c.clusterDomain (int $v.config.port)) -}}
{{- end -}}
{{- $cluster := dict "peers" $peers "secret_file" (printf "%s/%s" (include "mirrorcache.clusterDir" .) "secret") -}}
{{- range $key, $name := dict "ownerFirstByteTimeout" "owner_first_byte_timeout" "peerRequestTimeout" "peer_request_timeout" "probeInterval" "probe_interval" "dnsInterval" "dns_interval" -}}
{{- with index $c $key -}}
{{- $_ := set $cluster $name . -}}
{{- end -}}
{{- end -}}
{{- $_ := set $cfg "cluster" $cluster -}}
{{- end -}}
{{- if $v.policy.enabled -}}
{{- $_ := set $cfg "policy" (dict "file" (printf "%s/policy.yaml" (include "mirrorcache.policyDir" .)) "reload_interval" $v.policy.reloadInterval) -}}
{{- end -}}
{{- if $v.auth.enabled -}}
{{- $auth := dict "enabled" true "realm" $v.auth.realm "max_failed_logins" (int $v.auth.maxFailedLogins) "failed_login_window" $v.auth.failedLoginWindow -}}
{{- if $v.auth.htpasswd.existingSecret -}}
{{- $_ := set $auth "htpasswd" (printf "%s/htpasswd" (include "mirrorcache.authDir" .)) -}}
{{- end -}}
{{- if $v.auth.tokens.existingSecret -}}
{{- $_ := set $auth "tokens_file" (printf "%s/tokens" (include "mirrorcache.authDir" .)) -}}
{{- end -}}
{{- if $v.auth.groups -}}
{{- $_ := set $auth "groups" $v.auth.groups -}}
{{- end -}}
{{- $_ := set $cfg "auth" $auth -}}
{{- end -}}
{{- if $v.tls.enabled -}}
{{- $_ := set $cfg "tls" (dict "cert" (printf "%s/tls.crt" (include "mirrorcache.tlsDir" .)) "key" (printf "%s/tls.key" (include "mirrorcache.tlsDir" .))) -}}
{{- end -}}
{{- toYaml (mergeOverwrite $cfg $v.config.extra) -}}
{{- end -}}

{{/* The config's storage section for storage.type. */}}
{{- define "mirrorcache.storageConfig" -}}
{{- $st := .Values.storage -}}
{{- $out := dict -}}
{{- if eq $st.type "s3" -}}
{{- $s3 := $st.s3 -}}
{{- $c := dict "bucket" $s3.bucket -}}
{{- range $key, $name := dict "region" "region" "endpoint" "endpoint_url" "prefix" "prefix" "addressingStyle" "addressing_style" "sse" "sse" "kmsKeyId" "kms_key_id" "storageClass" "storage_class" "redirectExpiry" "redirect_expiry" "metadataTtl" "metadata_ttl" -}}
{{- with index $s3 $key -}}
{{- $_ := set $c $name . -}}
{{- end -}}
{{- end -}}
{{- with $s3.partSize -}}
{{- $_ := set $c "part_size" (include "mirrorcache.size" .) -}}
{{- end -}}
{{- with $s3.maxParallelParts -}}
{{- $_ := set $c "max_parallel_parts" (int .) -}}
{{- end -}}
{{- if $s3.redirect -}}
{{- $_ := set $c "redirect" true -}}
{{- end -}}
{{- $_ := set $c "local_cache" (dict "path" $s3.localCache.path "max_size" (include "mirrorcache.size" $s3.localCache.maxSize)) -}}
{{- $_ := set $out "s3" $c -}}
{{- else -}}
{{- $_ := set $out "filesystem" (dict "path" $st.filesystem.path) -}}
{{- with $st.maxSize -}}
{{- $_ := set $out "max_size" (include "mirrorcache.size" .) -}}
{{- $_ := set $out "high_watermark" $st.highWatermark -}}
{{- $_ := set $out "low_watermark" $st.lowWatermark -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* The policy file (policy.enabled without existingConfigMap). */}}
{{- define "mirrorcache.policy" -}}
{{- toYaml (dict "default" .Values.policy.default "rules" .Values.policy.rules) -}}
{{- end -}}

{{/* host:port clients use in NOTES (ingress host if any, else the Service DNS name). */}}
{{- define "mirrorcache.clientHost" -}}
{{- if and .Values.ingress.enabled .Values.ingress.hosts -}}
{{- (index .Values.ingress.hosts 0).host -}}
{{- else -}}
{{- printf "%s.%s.svc:%d" (include "mirrorcache.fullname" .) .Release.Namespace (int .Values.service.port) -}}
{{- end -}}
{{- end -}}

{{/* The upstreams nodeConfig writes hosts.toml for. */}}
{{- define "mirrorcache.nodeUpstreams" -}}
{{- if .Values.nodeConfig.upstreams -}}
{{- toYaml .Values.nodeConfig.upstreams -}}
{{- else -}}
{{- toYaml (keys .Values.config.upstreams | sortAlpha) -}}
{{- end -}}
{{- end -}}

{{/* containerd hosts.toml for upstream $name, the mirror at $mirror ("scheme://host:port"). */}}
{{- define "mirrorcache.hostsToml" -}}
{{- $up := index .root.Values.config.upstreams .name -}}
server = {{ (ternary "https://registry-1.docker.io" $up.url (eq .name "docker.io")) | quote }}

[host.{{ .mirror | quote }}]
  capabilities = ["pull", "resolve"]
{{- if .skipVerify }}
  skip_verify = true
{{- end }}
{{- end -}}
