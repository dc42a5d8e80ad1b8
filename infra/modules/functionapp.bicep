// The function app on Flex Consumption (FC1), running as the user-assigned identity: the
// host reaches its storage, the package container and Application Insights with it, and the
// proxy reaches Azure OpenAI and the tables with it (AZURE_CLIENT_ID picks it).
param planName string
param appName string
param location string
param tags object = {}

@description('Resource id of the user-assigned identity the app runs as.')
param identityId string

@description('Client id of that identity.')
param identityClientId string

param storageAccountName string
param deploymentContainerName string
param tableEndpoint string
param appInsightsConnectionString string
param openAiEndpoint string

@description('Name of the first Azure OpenAI account as a backend in usage reports (its region).')
param openAiBackendName string

@description('More Azure OpenAI accounts, each {name, endpoint, priority, weight}, after the first in AZURE_OPENAI_BACKENDS.')
param openAiExtraBackends array = []

// The proxy's backends (proxy.config.backends): the first account at priority 1, then the others.
var openAiBackends = concat([
  {
    name: openAiBackendName
    endpoint: openAiEndpoint
    priority: 1
    weight: 1
  }
], openAiExtraBackends)

@description('Azure OpenAI data-plane API version the proxy calls.')
param openAiApiVersion string = '2024-10-21'

// An app setting holding the secret is the simple choice for a time-boxed event; in
// production, store it in Key Vault and set a Key Vault reference
// (@Microsoft.KeyVault(SecretUri=...)). The platform resolves references with the
// system-assigned identity unless keyVaultReferenceIdentity names another: this app has only
// its user-assigned one, so the site sets it (below), and that identity needs Key Vault
// Secrets User on the vault.
@secure()
param organizerKey string

// The key of the stored hashes of event codes (proxy/config/hashing.py); the same on every deployment.
@secure()
param codeHashKey string

// Organizer sign-in with Entra ID through App Service authentication (docs/deploy.md, "Organizer
// sign-in with Entra ID"): off while the client id is empty. The app trusts the platform's
// principal header only with ORGANIZER_TRUST_APP_SERVICE_AUTH, set here with the config.
@description('Client id of the Entra ID app registration organizers sign in with; empty: the organizer key only.')
param organizerEntraClientId string = ''

@description('Tenant of that app registration.')
param organizerEntraTenantId string = tenant().tenantId

@description('Object ids of the organizers allowed to sign in, comma-separated.')
param organizerEntraObjectIds string = ''

@description('Ids of Entra ID groups whose members are organizers, comma-separated.')
param organizerEntraGroupIds string = ''

@description('Object ids of the Entra ID users who are admins (everything, every event), comma-separated.')
param organizerEntraAdminObjectIds string = ''

@description('Ids of Entra ID groups whose members are admins (everything, every event), comma-separated.')
param organizerEntraAdminGroupIds string = ''

@description('Object ids of the Entra ID users who are viewers (read the events shared with them), comma-separated.')
param organizerEntraViewerObjectIds string = ''

@description('Ids of Entra ID groups whose members are viewers (read the events shared with them), comma-separated.')
param organizerEntraViewerGroupIds string = ''

var entraSignIn = !empty(organizerEntraClientId)

@description('Most instances the app scales out to; Flex Consumption accepts 40 to 1000.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 100

@description('Memory per instance, in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Concurrent HTTP requests per instance before the platform adds one; Python apps get 1 unless told otherwise.')
@minValue(1)
param httpPerInstanceConcurrency int

@description('Always-ready instances for the HTTP scale group (named http by the platform); 0 for none.')
@minValue(0)
param alwaysReadyInstances int = 0

// The HTTP functions form one scale group, which the platform names 'http'.
var alwaysReady = [
  {
    name: 'http'
    instanceCount: alwaysReadyInstances
  }
]

resource storage 'Microsoft.Storage/storageAccounts@2024-01-01' existing = {
  name: storageAccountName
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  // checkov:skip=CKV_AZURE_225: Zone redundancy on Flex Consumption keeps at least two always-ready instances billed around the clock; a time-boxed event proxy scales to zero instead.
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

resource app 'Microsoft.Web/sites@2024-04-01' = {
  // checkov:skip=CKV_AZURE_222: The proxy is a public API for event attendees, so the app must accept public traffic; callers are checked by the proxy's event keys.
  // checkov:skip=CKV_AZURE_17: Attendees call with the OpenAI SDK and an event key; they have no client certificates.
  // checkov:skip=CKV_AZURE_212: Flex Consumption scales to zero between events; always-ready instances for failover would be billed while nobody calls.
  // checkov:skip=CKV_AZURE_213: App Service health check is not available on Flex Consumption; the platform replaces failed instances.
  // checkov:skip=CKV_AZURE_78: Flex Consumption has no FTP endpoint and rejects siteConfig.ftpsState (listed among the Flex Consumption deprecations).
  name: appName
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    keyVaultReferenceIdentity: identityId
    httpsOnly: true
    clientCertEnabled: false
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
        alwaysReady: (alwaysReadyInstances > 0) ? alwaysReady : []
        triggers: {
          http: {
            perInstanceConcurrency: httpPerInstanceConcurrency
          }
        }
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
    // Only properties Flex Consumption accepts: ftpsState, alwaysOn, linuxFxVersion,
    // functionAppScaleLimit and the rest of its deprecation list are rejected or moved to
    // functionAppConfig (checked by tests/test_infra.py). FUNCTIONS_EXTENSION_VERSION and
    // FUNCTIONS_WORKER_RUNTIME are not app settings here either: runtime carries them.
    siteConfig: {
      minTlsVersion: '1.2'
      http20Enabled: true
      appSettings: [
        {
          name: 'AzureWebJobsStorage__accountName'
          value: storage.name
        }
        {
          name: 'AzureWebJobsStorage__credential'
          value: 'managedidentity'
        }
        {
          name: 'AzureWebJobsStorage__clientId'
          value: identityClientId
        }
        {
          name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
          value: appInsightsConnectionString
        }
        {
          name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
          value: 'ClientId=${identityClientId};Authorization=AAD'
        }
        {
          // One JSON object per access line (proxy.edge.access): the workbook's queries parse them.
          name: 'LOG_FORMAT'
          value: 'json'
        }
        {
          name: 'PYTHON_ENABLE_INIT_INDEXING'
          value: '1'
        }
        {
          // The host refuses larger bodies before the worker reads them (default 100 MB): the proxy's
          // MAX_REQUEST_BYTES default (28 MiB) plus 1 MiB, HOST_BODY_LIMIT_BYTES in proxy/config/settings.py.
          name: 'FUNCTIONS_REQUEST_BODY_SIZE_LIMIT'
          value: '30408704'
        }
        {
          name: 'AZURE_CLIENT_ID'
          value: identityClientId
        }
        {
          name: 'AZURE_OPENAI_ENDPOINT'
          value: openAiEndpoint
        }
        {
          name: 'AZURE_OPENAI_API_VERSION'
          value: openAiApiVersion
        }
        {
          // Replaces AZURE_OPENAI_ENDPOINT when set; with no extra region it lists that one account.
          name: 'AZURE_OPENAI_BACKENDS'
          value: string(openAiBackends)
        }
        {
          name: 'STORAGE_TABLE_ENDPOINT'
          value: tableEndpoint
        }
        {
          name: 'ORGANIZER_KEY'
          value: organizerKey
        }
        {
          name: 'CODE_HASH_KEY'
          value: codeHashKey
        }
        {
          name: 'ORGANIZER_TRUST_APP_SERVICE_AUTH'
          value: entraSignIn ? 'true' : 'false'
        }
        {
          name: 'ORGANIZER_ENTRA_OBJECT_IDS'
          value: organizerEntraObjectIds
        }
        {
          name: 'ORGANIZER_ENTRA_GROUP_IDS'
          value: organizerEntraGroupIds
        }
        {
          name: 'ORGANIZER_ENTRA_ADMIN_OBJECT_IDS'
          value: organizerEntraAdminObjectIds
        }
        {
          name: 'ORGANIZER_ENTRA_ADMIN_GROUP_IDS'
          value: organizerEntraAdminGroupIds
        }
        {
          name: 'ORGANIZER_ENTRA_VIEWER_OBJECT_IDS'
          value: organizerEntraViewerObjectIds
        }
        {
          name: 'ORGANIZER_ENTRA_VIEWER_GROUP_IDS'
          value: organizerEntraViewerGroupIds
        }
      ]
    }
  }
}

// Attendees never sign in: authentication is not required (AllowAnonymous), the platform only
// signs organizers in at /.auth/login/aad and adds their principal to what reaches the app. The
// ID token flow needs no client secret; no token store, as Flex Consumption keeps no files.
resource authentication 'Microsoft.Web/sites/config@2022-09-01' = if (entraSignIn) {
  // checkov:skip=CKV_AZURE_13: checkov does not recognise authsettingsV2 as authentication; this resource is App Service authentication itself.
  // checkov:skip=CKV_AZURE_222: checkov reads every Microsoft.Web/sites/config as the site's web config; this is authsettingsV2, which has no such property (the site's own settings are on the app above).
  // checkov:skip=CKV_AZURE_63: checkov reads every Microsoft.Web/sites/config as the site's web config; this is authsettingsV2, which has no such property (the site's own settings are on the app above).
  // checkov:skip=CKV_AZURE_65: checkov reads every Microsoft.Web/sites/config as the site's web config; this is authsettingsV2, which has no such property (the site's own settings are on the app above).
  // checkov:skip=CKV_AZURE_66: checkov reads every Microsoft.Web/sites/config as the site's web config; this is authsettingsV2, which has no such property (the site's own settings are on the app above).
  // checkov:skip=CKV_AZURE_80: checkov reads every Microsoft.Web/sites/config as the site's web config; this is authsettingsV2, which has no such property (the site's own settings are on the app above).
  // checkov:skip=CKV_AZURE_88: checkov reads every Microsoft.Web/sites/config as the site's web config; this is authsettingsV2, which has no such property (the site's own settings are on the app above).
  parent: app
  name: 'authsettingsV2'
  properties: {
    platform: {
      enabled: true
    }
    globalValidation: {
      requireAuthentication: false
      unauthenticatedClientAction: 'AllowAnonymous'
    }
    httpSettings: {
      requireHttps: true
    }
    identityProviders: {
      azureActiveDirectory: {
        enabled: true
        registration: {
          clientId: organizerEntraClientId
          openIdIssuer: '${environment().authentication.loginEndpoint}${organizerEntraTenantId}/v2.0'
        }
        validation: {
          allowedAudiences: [
            organizerEntraClientId
            'api://${organizerEntraClientId}'
          ]
        }
      }
    }
    login: {
      tokenStore: {
        enabled: false
      }
    }
  }
}

output name string = app.name
output url string = 'https://${app.properties.defaultHostName}'
